-- get.lua: read one reservation record together with Redis's clock.
--
-- KEYS[1] the reservation record
-- Returns JSON: {"now": ms, "rec": record}, rec absent when there is no such reservation.
-- A one-key read: the record as stored. The clock lets the caller see a HELD record at or
-- past its deadline, which it then expires for real (transition.lua op "expire", which has
-- the stock keys) before answering: nothing ever reads EXPIRED while the hold still counts.

local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then return cjson.encode({now = now_ms()}) end
return cjson.encode({now = now_ms(), rec = hash_table(flat)})
