-- due.lua: the order ids whose hold deadline has passed, by Redis's clock.
--
-- KEYS[1] the expiry index (zset: order id -> deadline ms) of one partition
-- ARGV[1] the most ids to return
-- Returns the due order ids, earliest deadline first. Read-only: transition.lua (op expire)
-- re-checks state and deadline atomically, so every process may sweep at once.

return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
