-- consume.lua: one step of a deliverer on one subscription's partition (issue 12,
-- stockhold.delivery.deliverer), only while it holds the lease: acknowledge what it finished,
-- then claim the group's pending entries (takeover) or read a batch.
--
-- KEYS[1] the partition's event stream
-- KEYS[2] the subscription's lease on the partition `<tag>lease:<name>`
-- ARGV[1] the owner id (also its consumer name in the group)
-- ARGV[2] the group "sub:<name>"
-- ARGV[3] 'claim' | 'read' | 'ack' (only the acknowledgements)
-- ARGV[4] claim: the XAUTOCLAIM cursor ('0-0' to start); read: '>' (new entries) or an id
--         (this consumer's pending entries after it)
-- ARGV[5] the most entries to claim or read
-- ARGV[6..] entry ids to XACK first
-- Returns {0} when the lease is not the owner's (nothing done), else
--   claim: {1, next cursor ('0-0': done), pending entries that no longer exist (lost)};
--     when done, the group's other consumers with nothing pending are deleted;
--   ack: {1};
--   read: {1, entries}: each {id, {field, value, ...}}, or {id, nil} for a pending entry
--     that no longer exists.

local stream, owner, group, op = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', KEYS[2]) ~= owner then return {0} end
if #ARGV >= 6 then
  redis.call('XACK', stream, group, unpack(ARGV, 6))
end
if op == 'claim' then
  local r = redis.call('XAUTOCLAIM', stream, group, owner, 0, ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
  local gone = r[3] and #r[3] or 0
  if r[1] == '0-0' then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
      local name, pending
      for i = 1, #c, 2 do
        if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
      end
      if name ~= owner and pending == 0 then
        redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
      end
    end
  end
  return {1, r[1], gone}
elseif op == 'read' then
  local r = redis.call('XREADGROUP', 'GROUP', group, owner, 'COUNT', ARGV[5],
    'STREAMS', stream, ARGV[4])
  if not r or not r[1] then return {1, {}} end
  return {1, r[1][2]}
elseif op == 'ack' then
  return {1}
end
return redis.error_reply('consume.lua: unknown op ' .. tostring(op))
