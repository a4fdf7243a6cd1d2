-- adjust.lua: receipt (+) or shrinkage (-) of one sales unit's stock in one warehouse.
--
-- KEYS[1] the adjustment record (hash, in the adjustment id's partition)
-- KEYS[2] the event stream of that partition
-- KEYS[3] the stock hash of the sales unit
-- ARGV[1] JSON: {"aid": str, "fp": str, "wh": str, "delta": int, "reason": str,
--                "unit": [sku, spec, barcode], "maxlen": int, "retention": ms,
--                "actor": who adjusts (the event's actor)}
-- Returns JSON: {"ok": 1, "replayed": 0|1, "available": int, "reserved": int}
--               or {"err": REASON, "meta": {...}}
-- The same adjustment id again returns the stored answer and changes nothing.

local a = cjson.decode(ARGV[1])
local rk, ek, sk = KEYS[1], KEYS[2], KEYS[3]
local prev = redis.call('HMGET', rk, 'fp', 'av', 'rs')
if prev[1] then
  if prev[1] ~= a.fp then return cjson.encode({err = 'ADJUSTMENT_CONFLICT', meta = {adjustment_id = a.aid}}) end
  return cjson.encode({ok = 1, replayed = 1, available = tonumber(prev[2]), reserved = tonumber(prev[3])})
end
local cur = redis.call('HMGET', sk, 'a:' .. a.wh, 'r:' .. a.wh)
local avail, reserved = tonumber(cur[1]) or 0, tonumber(cur[2]) or 0
if a.delta < 0 and avail + a.delta < 0 then
  return cjson.encode({err = 'INSUFFICIENT_STOCK', meta = {sku = a.unit[1], spec = a.unit[2],
    barcode = a.unit[3], warehouse = a.wh, requested = -a.delta, available = avail}})
end
local now = now_ms()
avail = redis.call('HINCRBY', sk, 'a:' .. a.wh, a.delta)
if not cur[2] then redis.call('HSET', sk, 'r:' .. a.wh, 0) end
redis.call('HSET', rk, 'fp', a.fp, 'av', avail, 'rs', reserved, 'ts', now)
redis.call('PEXPIRE', rk, a.retention)
emit(ek, a.maxlen, 'STOCK_ADJUSTED', 'adjustment_id', a.aid, now,
  {sku = a.unit[1], spec = a.unit[2], barcode = a.unit[3], warehouse = a.wh, delta = a.delta,
   reason = a.reason, available = avail, reserved = reserved}, a.actor)
return cjson.encode({ok = 1, replayed = 0, available = avail, reserved = reserved})
