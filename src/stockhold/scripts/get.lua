-- get.lua: read one reservation record together with Redis's clock.
--
-- KEYS[1] the reservation record
-- Returns JSON: {"now": ms, "rec": record}, rec absent when there is no such reservation.
-- The clock lets the caller report a HELD record past its deadline as EXPIRED: the deadline
-- decides, not the sweeper.

local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then return cjson.encode({now = now_ms()}) end
return cjson.encode({now = now_ms(), rec = hash_table(flat)})
