-- fail.lua: an event that used up its attempts under FLOW (issue 12,
-- stockhold.delivery.deliverer): acknowledged, and kept in the subscription's failed set of
-- its partition with the body that was POSTed, for ReplayFailed. Only while the caller holds
-- the lease.
--
-- KEYS[1] the partition's event stream
-- KEYS[2] the lease `<tag>lease:<name>`
-- KEYS[3] the failed set `<tag>failed:<name>` (zset: stream id -> entry ms)
-- KEYS[4] the failed events `<tag>failedev:<name>` (hash: stream id -> JSON)
-- ARGV[1] the owner id, ARGV[2] the group, ARGV[3] the entry id, ARGV[4] its ms,
-- ARGV[5] JSON {"body", "error", "attempts", "at"}
-- ARGV[6..] other entry ids to XACK (finished before it)
-- Returns 1, or 0 when the lease is not the caller's (nothing changed).

local stream, owner, group, id = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', KEYS[2]) ~= owner then return 0 end
if #ARGV >= 6 then
  redis.call('XACK', stream, group, unpack(ARGV, 6))
end
redis.call('XACK', stream, group, id)
redis.call('ZADD', KEYS[3], ARGV[4], id)
redis.call('HSET', KEYS[4], id, ARGV[5])
return 1
