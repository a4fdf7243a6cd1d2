-- payment_mark.lua: MarkPaymentPending: poll a provider for a HELD reservation's payment.
--
-- KEYS[1] the reservation record
-- KEYS[2] the poll index (zset: order id -> next poll ms, Redis clock) of the order's partition
-- KEYS[3] the event stream of the order's partition
-- KEYS[4] the out_trade_no -> order id map key of the payment
-- ARGV[1] JSON: {"oid": order id, "prov": provider, "otn": out_trade_no, "maxlen": int,
--                "pay": {"steps": [ms, ...], "margin": ms, "ttl": ms},
--                "actor": who marks it (the event's actor)}
-- Returns JSON: {"ok": 1, "changed": 0|1, "rec": record, "now": ms}
--               {"err": REASON, "meta": {...}}   refused, nothing written
--               {"err": "RESERVATION_EXPIRED", "due": 1}  refused, nothing written: a HELD
--                  record at or past its deadline, which the caller expires (transition.lua
--                  op "expire": the stock keys are not this script's) before answering
-- HELD only: COMMITTED, RELEASED and EXPIRED (also HELD at or past its deadline) are refused
-- with their reason; an out_trade_no already mapped to another order is PAYMENT_CONFLICT. The
-- same payment again while it is being polled changes nothing; another payment (or the same
-- one once its polls stopped) starts the schedule again, with one PAYMENT_PENDING event.

local rk, pk, ek, mk = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local a = cjson.decode(ARGV[1])
local now = now_ms()
local rec = hash_table(redis.call('HGETALL', rk))
if rec.st == nil then
  return cjson.encode({err = 'RESERVATION_NOT_FOUND', meta = {order_id = a.oid}})
end
if rec.st == 'C' then return cjson.encode({err = 'RESERVATION_COMMITTED'}) end
if rec.st == 'R' then return cjson.encode({err = 'RESERVATION_RELEASED'}) end
if rec.st == 'E' then return cjson.encode({err = 'RESERVATION_EXPIRED'}) end
local dl = tonumber(rec.dl)
if now >= dl then return cjson.encode({err = 'RESERVATION_EXPIRED', due = 1}) end
local conflict = payment_conflict(mk, a.oid, a.otn)
if conflict then return cjson.encode(conflict) end
if rec.pst == 'PENDING' and rec.pprov == a.prov and rec.potn == a.otn
    and redis.call('ZSCORE', pk, a.oid) then
  return cjson.encode({ok = 1, changed = 0, rec = rec, now = now})
end

-- Everything checked: write.
local first = start_polling(rk, pk, mk, a.oid, a.prov, a.otn, now, dl, a.pay)
emit(ek, a.maxlen, 'PAYMENT_PENDING', 'order_id', a.oid, now,
  {provider = a.prov, out_trade_no = a.otn, next_poll_at = first}, a.actor)
return cjson.encode({ok = 1, changed = 1, rec = hash_table(redis.call('HGETALL', rk)), now = now})
