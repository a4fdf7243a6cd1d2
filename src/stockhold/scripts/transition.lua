-- transition.lua: move a batch of HELD reservations forward: commit, release, a payment
-- report, or the expiry of a due hold found by a read (the sweeper's is expire.lua).
--
-- KEYS[1] the SKU index (zset), then one group per order, groups back to back:
--   [g+1] the reservation record   [g+2] the expiry index of its partition
--   [g+3] the event stream of its partition
--   [g+4 .. g+3+n] the stock hashes named in the record's "keys" field, in that order
--   [g+4+n .. g+3+n+m] the SKU policy hashes named in its "skeys" field (m = 0: none stored)
--   [g+4+n+m .. g+3+n+m+x] extra keys of the op (x = 0 but for "pay": the poll index of the
--                          order's partition)
-- ARGV[1]   JSON header: {"maxlen": int, "retention": ms,
--                         "pol": {"thr": units, "bms": bucket ms, "nb": buckets}}
-- ARGV[1+i] JSON of order i: {"op": "commit"|"release"|"pay"|"expire", "oid": str, "n": int,
--                             "m": int, "x": int, "arg": payment_ref (commit) | reason (release)
--                             | JSON of the payment report (pay, see report_one) | "" (expire)}
-- A commit counts its units as sold in each SKU's trailing sales window (auto-hot detection).
-- Returns a JSON array, one entry per order:
--   {"ok": 1, "changed": 0|1, "rec": record}   the reservation after the call
--   {"err": REASON}                             refused, nothing written (but see commit)
--   pay: {"ok": 1, "replayed": 0|1, "rec": record} or {"err": REASON, "meta": {...}}
--   expire: {"ok": 1, "changed": 0|1, "rec": record, "stuck": 1 (refused: a reserved counter
--           below the hold; nothing written, the record is returned as it is)}
-- States only move forward: H -> C | R | E. The deadline decides, not the sweeper: a HELD
-- record at or after its deadline is expired by whichever call finds it first, exactly as
-- expire.lua would (stock back, out of the expiry index, one ORDER_EXPIRED event, st = E,
-- up = the event's ts, retention). So a commit at or after the deadline expires the hold and
-- is then refused RESERVATION_EXPIRED; a release at or after it becomes the expiry; op
-- "expire" (GetReservation, ExtendReservation and MarkPaymentPending on a due hold) expires
-- it and changes nothing otherwise. Each re-checks st == 'H' in this call, so the sweeper and
-- concurrent readers never write a second expiry.

local header = cjson.decode(ARGV[1])
local now = now_ms()
local results = {}
local base = 1

local function count_sold(rec, alloc, first_sku, m)
  if m == 0 then return end
  local units, usk, per = cjson.decode(rec.units), cjson.decode(rec.usk), {}
  for _, a in ipairs(alloc) do
    local j = usk[a[1]]
    per[j] = (per[j] or 0) + a[3]
  end
  for j = 1, m do
    if per[j] then
      local sku = nil
      for u, uj in ipairs(usk) do if uj == j then sku = units[u][1] break end end
      sku_add_sold(KEYS[first_sku + j - 1], KEYS[1], sku, now, header.pol, per[j])
    end
  end
end

local function apply(rec, rk, xk, ek, keys, to, extra_field, extra, first_sku, m, more)
  local alloc = cjson.decode(rec.alloc)
  for _, a in ipairs(alloc) do
    local r = tonumber(redis.call('HGET', keys[a[1]], 'r:' .. a[2])) or 0
    if r < a[3] then return {err = 'INTERNAL', meta = {detail = 'reserved counter below hold'}} end
  end
  for _, a in ipairs(alloc) do
    local key, wh, q = keys[a[1]], a[2], a[3]
    redis.call('HINCRBY', key, 'r:' .. wh, -q)
    if to ~= 'C' then redis.call('HINCRBY', key, 'a:' .. wh, q) end
  end
  if to == 'C' then count_sold(rec, alloc, first_sku, m) end
  rec.st, rec.up = to, now
  if extra_field then
    rec[extra_field] = extra
    redis.call('HSET', rk, 'st', to, 'up', now, extra_field, extra)
  else
    redis.call('HSET', rk, 'st', to, 'up', now)
  end
  redis.call('ZREM', xk, rec.oid)
  redis.call('PEXPIRE', rk, header.retention)
  local etype = ({C = 'ORDER_COMMITTED', R = 'ORDER_RELEASED', E = 'ORDER_EXPIRED'})[to]
  local data = {allocations = alloc_payload(rec)}
  if extra_field then data[extra_field == 'pref' and 'payment_ref' or 'reason'] = extra end
  if more then
    for k, v in pairs(more) do data[k] = v end
  end
  emit(ek, header.maxlen, etype, 'order_id', rec.oid, now, data)
  return {ok = 1, changed = 1, rec = rec}
end

-- ReportPayment (op "pay"). o.arg: {"prov": provider, "tx": transaction id ("" allowed unless
-- PAID), "status": "PAID"|"FAILED"|"CLOSED", "amount": minor units, "paid_at": ms (0: none)}.
-- Idempotent by (provider, transaction id): the first report's answer is stored in the record
-- (field "t:<provider>:<tx>", "t:<provider>:~<status>" without a tx id) and every later report
-- of that transaction gets it back, replayed, writing nothing. Otherwise:
--   PAID, amount given at Reserve and different: refused PAYMENT_AMOUNT_MISMATCH, flagged
--     AMOUNT_MISMATCH, one PAYMENT_FLAGGED event, never committed;
--   PAID when another transaction already paid it: flagged REFUND (DUPLICATE_PAYMENT);
--   PAID, HELD before its deadline: committed (payment_ref = tx), as op "commit";
--   PAID, COMMITTED (by Commit): recorded, nothing else changes;
--   PAID, RELEASED: flagged REFUND (PAID_AFTER_RELEASE);
--   PAID, EXPIRED or HELD at/after its deadline (expired first, as expire.lua would): one
--     PAYMENT_AFTER_EXPIRY event; the same allocations are taken again as a deduction when
--     every one is available (plate = now, counted as sold), else flagged REFUND;
--   FAILED / CLOSED, HELD: released ("payment FAILED") or, at/after the deadline, expired;
--     finished reservations are left as they are.
-- Every decided report stops the order's polls. States only move forward.
local function report_one(o, rec, rk, xk, ek, keys, first_sku, m, pk)
  local p = cjson.decode(o.arg)
  local tfield = 't:' .. p.prov .. ':' .. (p.tx ~= '' and p.tx or ('~' .. p.status))
  local stored = redis.call('HGET', rk, tfield)
  if stored then
    local answer = cjson.decode(stored)
    if answer.err then return {err = answer.err, meta = answer.meta} end
    return {ok = 1, changed = 0, replayed = 1, rec = rec}
  end
  local st, due = rec.st, now >= tonumber(rec.dl)
  local amt = tonumber(rec.amt) or 0
  local oid, maxlen = rec.oid, header.maxlen
  local info = {provider = p.prov, transaction_id = p.tx, status = p.status, amount = p.amount}
  local paid = {'pst', 'PAID', 'ptx', p.tx}
  if p.paid_at > 0 then paid[#paid + 1] = 'ppaid' paid[#paid + 1] = p.paid_at end
  if not rec.pprov or rec.pprov == '' then paid[#paid + 1] = 'pprov' paid[#paid + 1] = p.prov end
  local function with(fields, ...)
    local out = {unpack(fields)}
    for _, v in ipairs({...}) do out[#out + 1] = v end
    return out
  end
  -- Write the payment fields and the stored answer, stop the polls; the reply re-reads.
  local function settle(answer, fields)
    redis.call('HSET', rk, tfield, cjson.encode(answer), unpack(fields))
    redis.call('ZREM', pk, oid)
    redis.call('HDEL', rk, 'pnext')
    if redis.call('HGET', rk, 'st') ~= 'H' then redis.call('PEXPIRE', rk, header.retention) end
    return {ok = 1, changed = 1, replayed = 0, rec = hash_table(redis.call('HGETALL', rk))}
  end
  local function flagged(flag, reason, extra)
    local data = {flag = flag, reason = reason, payment = info}
    for k, v in pairs(extra or {}) do data[k] = v end
    emit(ek, maxlen, 'PAYMENT_FLAGGED', 'order_id', oid, now, data)
  end
  if p.status == 'PAID' then
    if amt > 0 and p.amount ~= amt then
      local answer = {err = 'PAYMENT_AMOUNT_MISMATCH', meta = {expected = amt, got = p.amount}}
      settle(answer, {'pflag', 'AMOUNT_MISMATCH'})
      flagged('AMOUNT_MISMATCH', 'AMOUNT_MISMATCH', {expected = amt})
      return answer
    end
    if rec.pst == 'PAID' then
      -- paid already, by another transaction (the same one was answered above)
      flagged('REFUND', 'DUPLICATE_PAYMENT', {paid_by = rec.ptx})
      return settle({ok = 1}, {'pflag', 'REFUND'})
    end
    if st == 'H' and not due then
      local r = apply(rec, rk, xk, ek, keys, 'C', 'pref', p.tx, first_sku, m, {payment = info})
      if r.err then return r end
      return settle({ok = 1}, paid)
    elseif st == 'C' then
      return settle({ok = 1}, paid)
    elseif st == 'R' then
      flagged('REFUND', 'PAID_AFTER_RELEASE')
      return settle({ok = 1}, with(paid, 'pflag', 'REFUND'))
    end
    -- EXPIRED, or HELD at/after its deadline: the deadline decided before the payment came.
    if st == 'H' then
      local r = apply(rec, rk, xk, ek, keys, 'E')
      if r.err then return r end
    end
    local alloc, enough = cjson.decode(rec.alloc), true
    for _, a in ipairs(alloc) do
      if (tonumber(redis.call('HGET', keys[a[1]], 'a:' .. a[2])) or 0) < a[3] then
        enough = false
        break
      end
    end
    local data = {allocations = alloc_payload(rec), payment = info, recommitted = enough}
    local fields
    if enough then
      for _, a in ipairs(alloc) do redis.call('HINCRBY', keys[a[1]], 'a:' .. a[2], -a[3]) end
      count_sold(rec, alloc, first_sku, m)
      fields = with(paid, 'plate', now)
    else
      data.flag = 'REFUND'
      fields = with(paid, 'pflag', 'REFUND')
    end
    emit(ek, maxlen, 'PAYMENT_AFTER_EXPIRY', 'order_id', oid, now, data)
    return settle({ok = 1}, fields)
  end
  -- FAILED / CLOSED
  if st == 'H' then
    local r
    if due then
      r = apply(rec, rk, xk, ek, keys, 'E')
    else
      r = apply(rec, rk, xk, ek, keys, 'R', 'why', 'payment ' .. p.status, nil, nil,
        {payment = info})
    end
    if r.err then return r end
    return settle({ok = 1}, {'pst', p.status, 'ptx', p.tx})
  end
  -- finished already: nothing to undo
  return settle({ok = 1}, rec.pst == 'PENDING' and {'pst', p.status} or {})
end

local function transition_one(o, rk, xk, ek, first_stock)
  local op = o.op
  local rec = hash_table(redis.call('HGETALL', rk))
  if rec.st == nil then return {err = 'RESERVATION_NOT_FOUND'} end
  local keys = cjson.decode(rec.keys)
  if #keys ~= o.n then return {err = 'KEYS_CHANGED'} end
  for u = 1, o.n do
    if keys[u] ~= KEYS[first_stock + u - 1] then return {err = 'KEYS_CHANGED'} end
  end
  local m = o.m or 0
  local skeys = rec.skeys and cjson.decode(rec.skeys) or {}
  if #skeys ~= m then return {err = 'KEYS_CHANGED'} end
  local first_sku = first_stock + o.n
  for j = 1, m do
    if skeys[j] ~= KEYS[first_sku + j - 1] then return {err = 'KEYS_CHANGED'} end
  end
  if op == 'pay' then
    return report_one(o, rec, rk, xk, ek, keys, first_sku, m, KEYS[first_sku + m])
  end
  local st, due = rec.st, now >= tonumber(rec.dl)
  if op == 'expire' then
    if st ~= 'H' or not due then return {ok = 1, changed = 0, rec = rec} end
    local r = apply(rec, rk, xk, ek, keys, 'E')
    if r.err then return {ok = 1, changed = 0, rec = rec, stuck = 1} end
    return r
  end
  if op == 'commit' then
    if st == 'C' then return {ok = 1, changed = 0, rec = rec} end
    if st == 'R' then return {err = 'RESERVATION_RELEASED'} end
    if st == 'H' and due then
      -- the deadline decided first: expire it now, then refuse
      local r = apply(rec, rk, xk, ek, keys, 'E')
      if r.err then return r end
    end
    if st == 'E' or due then return {err = 'RESERVATION_EXPIRED'} end
    return apply(rec, rk, xk, ek, keys, 'C', 'pref', o.arg, first_sku, m)
  end
  -- release
  if st == 'R' or st == 'E' then return {ok = 1, changed = 0, rec = rec} end
  if st == 'C' then return {err = 'RESERVATION_COMMITTED'} end
  if due then return apply(rec, rk, xk, ek, keys, 'E') end
  return apply(rec, rk, xk, ek, keys, 'R', 'why', o.arg)
end

for i = 2, #ARGV do
  local o = cjson.decode(ARGV[i])
  results[i - 1] = transition_one(o, KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], base + 4)
  base = base + 3 + o.n + (o.m or 0) + (o.x or 0)
end
return cjson.encode(results)
