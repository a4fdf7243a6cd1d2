-- count.lua: a cycle count (SetOnHand): one sales unit's on-hand stock in one warehouse, as
-- counted, so available becomes on_hand - reserved (negative when the count is below what is
-- reserved: stored and reported as oversold, never clamped).
--
-- KEYS[1] the count record (hash, in the unit's SKU partition: every key of the call is in
--         that one slot)
-- KEYS[2] the event stream of that partition
-- KEYS[3] the stock hash of the sales unit
-- ARGV[1] JSON: {"cid": str, "fp": str, "wh": str, "on_hand": int, "at": ms (counted_at),
--                "unit": [sku, spec, barcode], "maxlen": int, "retention": ms, "actor": str}
-- Returns JSON: {"ok": 1, "replayed": 0|1, "available": int, "reserved": int, "previous": int}
--               or {"err": REASON, "meta": {...}}
-- The same count id again returns the stored answer and changes nothing; another count under
-- it is COUNT_CONFLICT. A count older than the last one applied to the unit and warehouse
-- (stock hash field "c:<warehouse>", ms) is STALE_COUNT, and changes nothing.

local a = cjson.decode(ARGV[1])
local rk, ek, sk = KEYS[1], KEYS[2], KEYS[3]
local prev = redis.call('HMGET', rk, 'fp', 'av', 'rs', 'prev')
if prev[1] then
  if prev[1] ~= a.fp then return cjson.encode({err = 'COUNT_CONFLICT', meta = {count_id = a.cid}}) end
  return cjson.encode({ok = 1, replayed = 1, available = tonumber(prev[2]),
    reserved = tonumber(prev[3]), previous = tonumber(prev[4])})
end
local cur = redis.call('HMGET', sk, 'a:' .. a.wh, 'r:' .. a.wh, 'c:' .. a.wh)
local last = tonumber(cur[3])
if last and a.at < last then
  return cjson.encode({err = 'STALE_COUNT', meta = {count_id = a.cid, warehouse = a.wh,
    last_counted_at_ms = last}})
end
local reserved = tonumber(cur[2]) or 0
local previous = (tonumber(cur[1]) or 0) + reserved
local avail = a.on_hand - reserved
local now = now_ms()
redis.call('HSET', sk, 'a:' .. a.wh, avail, 'r:' .. a.wh, reserved, 'c:' .. a.wh, a.at)
redis.call('HSET', rk, 'fp', a.fp, 'av', avail, 'rs', reserved, 'prev', previous, 'ts', now)
redis.call('PEXPIRE', rk, a.retention)
emit(ek, a.maxlen, 'STOCK_COUNTED', 'adjustment_id', a.cid, now,
  {sku = a.unit[1], spec = a.unit[2], barcode = a.unit[3], warehouse = a.wh, count_id = a.cid,
   counted_at = a.at, on_hand = a.on_hand, previous_on_hand = previous, reserved = reserved,
   available = avail, oversold = avail < 0}, a.actor)
return cjson.encode({ok = 1, replayed = 0, available = avail, reserved = reserved,
  previous = previous})
