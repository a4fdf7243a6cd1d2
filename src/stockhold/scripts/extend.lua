-- extend.lua: push a HELD reservation's deadline out, never in:
-- new deadline = max(current deadline, Redis's now + hold_seconds).
--
-- KEYS[1] the reservation record
-- KEYS[2] the expiry index (zset: order id -> deadline ms) of the order's partition
-- KEYS[3] the event stream of the order's partition
-- ARGV[1] the order id
-- ARGV[2] hold_seconds, an integer within 1..ARGV[3]
-- ARGV[3] max_hold_seconds
-- ARGV[4] approximate maximum length of the event stream
-- ARGV[5] who extends it (the event's actor)
-- Returns JSON: {"ok": 1, "changed": 0|1, "rec": record, "now": ms}  the reservation after
--                                                                    the call
--               {"err": REASON, "meta": {...}}   refused, nothing written
--               {"err": "RESERVATION_EXPIRED", "due": 1}  refused, nothing written: a HELD
--                  record at or past its deadline, which the caller expires (transition.lua
--                  op "expire": the stock keys are not this script's) before answering
-- HELD only: COMMITTED, RELEASED and EXPIRED are refused with their reason, and so is a HELD
-- reservation at or past its deadline (the deadline decided; it is never revived). A call
-- that moves the deadline writes the record's dl and the index score and appends one
-- ORDER_EXTENDED event; one that would not move it (now + hold is not later than the current
-- deadline) writes nothing at all: shortening a hold is what Release is for.

local rk, xk, ek = KEYS[1], KEYS[2], KEYS[3]
local oid = ARGV[1]
local hold, max_hold, maxlen = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if not hold or not max_hold or hold % 1 ~= 0 or hold < 1 or hold > max_hold then
  return cjson.encode({err = 'INVALID_ARGUMENT', meta = {field = 'hold_seconds'}})
end
local now = now_ms()
local rec = hash_table(redis.call('HGETALL', rk))
if rec.st == nil then return cjson.encode({err = 'RESERVATION_NOT_FOUND', meta = {order_id = oid}}) end
if rec.st == 'C' then return cjson.encode({err = 'RESERVATION_COMMITTED'}) end
if rec.st == 'R' then return cjson.encode({err = 'RESERVATION_RELEASED'}) end
if rec.st == 'E' then return cjson.encode({err = 'RESERVATION_EXPIRED'}) end
local previous = tonumber(rec.dl)
if now >= previous then return cjson.encode({err = 'RESERVATION_EXPIRED', due = 1}) end

local deadline = now + hold * 1000
if deadline <= previous then
  -- it would not move (or would come closer): nothing to write
  return cjson.encode({ok = 1, changed = 0, rec = rec, now = now})
end

-- Everything checked: write.
rec.dl = deadline
redis.call('HSET', rk, 'dl', deadline)
redis.call('ZADD', xk, deadline, oid)
emit(ek, maxlen, 'ORDER_EXTENDED', 'order_id', oid, now,
  {expires_at = deadline, previous_expires_at = previous, hold_seconds = hold}, ARGV[5])
return cjson.encode({ok = 1, changed = 1, rec = rec, now = now})
