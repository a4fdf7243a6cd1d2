-- group.lua: a subscription's consumer group on one partition's event stream (issue 12,
-- stockhold.delivery.subscriptions), and the subscription's other keys of that partition.
--
-- KEYS[1] the partition's event stream
-- KEYS[2..] (destroy only) the subscription's keys of that partition: lease, failed set, failed
--           events, delivery statistics
-- ARGV[1] 'create' | 'destroy' | 'setid'
-- ARGV[2] the group name
-- ARGV[3] (create, setid) the position: a stream id, '$' (the stream's last entry) or '0'
-- Returns [changed 0|1, the id of the stream's first entry or '' when it is empty]:
--   create: 1 when created at the position, 0 when the group existed (left as it was);
--   destroy: 1 when the group existed; the other keys are deleted either way;
--   setid: 1 (the group's last-delivered id is now the position); NOGROUP is an error.

local op, group, stream = ARGV[1], ARGV[2], KEYS[1]
local changed = 0
if op == 'create' then
  local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', stream, group, ARGV[3], 'MKSTREAM')
  if ok then
    changed = 1
  elseif not string.find(tostring(err.err or err), 'BUSYGROUP', 1, true) then
    return redis.error_reply(tostring(err.err or err))
  end
elseif op == 'destroy' then
  if redis.call('EXISTS', stream) == 1 then
    changed = redis.call('XGROUP', 'DESTROY', stream, group)
  end
  for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
elseif op == 'setid' then
  redis.call('XGROUP', 'SETID', stream, group, ARGV[3])
  changed = 1
else
  return redis.error_reply('group.lua: unknown op ' .. tostring(op))
end
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if first[1] then return {changed, first[1][1]} end
return {changed, ''}
