-- finish.lua: Redis Cluster, an order whose keys span slots (docs/cluster.md): write its home
-- record once every part holds its lines (reserve.lua, flag 4), in the order's home slot.
--
-- KEYS[1] the reservation record   KEYS[2] the expiry index of the order's partition
-- KEYS[3] the event stream of the order's partition   KEYS[4] the order's abort set
-- with a payment only: KEYS[5] the poll index of the order's partition
-- ARGV[1] the configuration id the call was built for (CONFIG_ID)
-- ARGV[2] order id   ARGV[3] fingerprint   ARGV[4] hold (s, text)
-- ARGV[5] units: the record's "units" (JSON, every unit of the order)
-- ARGV[6] alloc: the record's "alloc" (JSON, unit indexes into units)
-- ARGV[7] parts: the record's "parts" (JSON [[partition, nonce], ...])
-- ARGV[8] the event's allocations (JSON [[sku, spec, barcode, warehouse, qty], ...])
-- ARGV[9] amount (minor units, "0": none)   ARGV[10] provider ("": no payment)
-- ARGV[11] out_trade_no (claimed before in its own slot: claim.lua)
-- ARGV[12] who reserves (the event's actor)
-- ARGV[13..] the parts' nonces
-- Returns JSON: [1, now, deadline, first poll ms or 0]   written now
--               [2, record]   replayed: the record exists with this fingerprint
--               [0, REASON]   refused, nothing written: ORDER_CONFLICT (another fingerprint)
--                             or ABORTED (a part of this attempt was given back: retry)
-- A recovery pass that finds a part without its home record aborts the part's nonce here
-- (abort.lua) before giving its stock back; so a part is either in a record or given back,
-- never both.

if ARGV[1] ~= CONFIG_ID then
  return redis.error_reply('STOCKHOLD_CONFIG finish.lua built for configuration ' .. CONFIG_ID
    .. ', called for ' .. tostring(ARGV[1]))
end

local rk, xk, ek, ak = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local oid, fp, hold_s = ARGV[2], ARGV[3], ARGV[4]
local existing = redis.call('HGET', rk, 'fp')
if existing then
  if existing ~= fp then return '[0,"ORDER_CONFLICT"]' end
  return cjson.encode({2, redis.call('HGETALL', rk)})
end
for i = 13, #ARGV do
  if redis.call('SISMEMBER', ak, ARGV[i]) == 1 then return '[0,"ABORTED"]' end
end
local now, now_s = now_ms()
local dl = now + tonumber(hold_s) * 1000
local dl_s = string.format('%d', dl)
local fields = {'st', 'H', 'oid', oid, 'fp', fp, 'cr', now_s, 'dl', dl_s, 'hold', hold_s,
  'keys', '[]', 'units', ARGV[5], 'alloc', ARGV[6], 'skeys', '', 'usk', '[]', 'parts', ARGV[7]}
local data = {allocations = cjson.decode(ARGV[8]), expires_at = dl}
if ARGV[9] ~= '0' then
  fields[#fields + 1] = 'amt'
  fields[#fields + 1] = ARGV[9]
  data.amount = tonumber(ARGV[9])
end
redis.call('HSET', rk, unpack(fields))
redis.call('ZADD', xk, dl_s, oid)
local first = 0
if ARGV[10] ~= '' then
  first = start_polling(rk, KEYS[5], nil, oid, ARGV[10], ARGV[11], now, dl, CFG_PAY())
  data.payment = {provider = ARGV[10], out_trade_no = ARGV[11], next_poll_at = first}
end
emit(ek, CFG_MAXLEN, 'ORDER_RESERVED', 'order_id', oid, now_s, data, ARGV[12])
return cjson.encode({1, now, dl, first})
