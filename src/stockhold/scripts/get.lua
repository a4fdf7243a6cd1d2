-- get.lua: read one reservation record together with Redis's clock.
--
-- KEYS[1] the reservation record
-- Returns JSON: {"now": ms, "rec": record}, rec absent when there is no such reservation.
-- A one-key read: the record as stored. The clock lets the caller see a HELD record at or
-- past its deadline, which it then expires for real (transition.lua op "expire", which has
-- the stock keys) before answering: nothing ever reads EXPIRED while the hold still counts.

-- Redis Cluster, an order whose stock is in parts (docs/cluster.md): "settling" is 1 while a
-- finished record's parts may not have followed yet (the order is in its partition's settle
-- index, in this slot); the caller settles them before answering.

local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then return cjson.encode({now = now_ms()}) end
local rec = hash_table(flat)
if rec.parts and rec.st ~= 'H' then
  if redis.call('ZSCORE', settle_index(KEYS[1]), rec.oid) then
    return cjson.encode({now = now_ms(), rec = rec, settling = 1})
  end
end
return cjson.encode({now = now_ms(), rec = rec})
