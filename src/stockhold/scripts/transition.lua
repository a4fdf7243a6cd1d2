-- transition.lua: move a batch of HELD reservations forward: commit, release, a payment
-- report, or the expiry of a due hold found by a read (the sweeper's is expire.lua).
--
-- KEYS, one group per order, groups back to back:
--   [g+1] the reservation record   [g+2] the expiry index of its partition (a part: the
--         parts index of the part's partition)
--   [g+3] the event stream of its partition
--   [g+4 .. g+3+n] the stock hashes named in the record's "keys" field, in that order
--   [g+4+n .. g+3+n+m] the SKU policy hashes named in its "skeys" field (m = 0: none stored)
--   [g+4+n+m .. g+3+n+m+x] extra keys of the op (x = 0 but for "pay": the poll index of the
--                          order's partition)
-- ARGV[1] the configuration id the call was built for (CONFIG_ID, see stockhold.scripts).
-- Then per order, 7 plain fields: op ("commit" | "release" | "pay" | "expire" | "part" |
--   "undo"), order id,
--   counts (3 bytes: n, m, x), the record's "keys" and "skeys" texts the caller built KEYS
--   from ("" for a record without skeys), arg (payment_ref (commit) | reason (release) | JSON
--   of the payment report (pay, see report_one) | "" (expire) | the state the order's home
--   record reached, C, R or E (part) | the attempt's nonce (undo)), actor (who causes it: the
--   actor of every event the order's op appends; "part" and "undo" append none).
-- Redis Cluster, orders whose keys span slots (docs/cluster.md): the home record has a
-- "parts" field and no stock keys; its transitions change the record, the expiry index and
-- the events as for any order, and queue the order in the partition's settle index (at now +
-- the recovery window), stock untouched. Each part record ("nc": the nonce of the attempt that
-- made it) then follows its home: op "part" moves a HELD part to the given state with its
-- stock (and sales, for C), no event, out of the parts index; op "undo" gives a HELD part's
-- stock back and deletes it, if it still has the attempt's nonce (a Reserve that did not
-- finish).
--   KEYS match the record when those texts equal the record's: nothing to decode to check.
-- A commit counts its units as sold in each SKU's trailing sales window (auto-hot detection).
-- Returns one JSON text, an array with one entry per order (built as text: Redis converts a
-- Lua table reply element by element, at a high cost):
--   [1, changed 0|1, record, replayed 0|1, stuck 0|1, settling 0|1]   the reservation after
--       the call (settling: see the end of this script), the
--       record flat [field, value, ...] (a field may repeat: the last value counts);
--       pay: replayed 1 when the report was seen before; expire: stuck 1 when refused (a
--       reserved counter below the hold; nothing written, the record returned as it is)
--   [0, REASON, meta or null]    refused, nothing written (but see commit)
-- States only move forward: H -> C | R | E. The deadline decides, not the sweeper: a HELD
-- record at or after its deadline is expired by whichever call finds it first, exactly as
-- expire.lua would (stock back, out of the expiry index, one ORDER_EXPIRED event, st = E,
-- up = the event's ts, retention). So a commit at or after the deadline expires the hold and
-- is then refused RESERVATION_EXPIRED; a release at or after it becomes the expiry; op
-- "expire" (GetReservation, ExtendReservation and MarkPaymentPending on a due hold) expires
-- it and changes nothing otherwise. Each re-checks st == 'H' in this call, so the sweeper and
-- concurrent readers never write a second expiry.

if ARGV[1] ~= CONFIG_ID then
  return redis.error_reply('STOCKHOLD_CONFIG transition.lua built for configuration '
    .. CONFIG_ID .. ', called for ' .. tostring(ARGV[1]))
end

local now, now_s = now_ms()
-- The actor of the order being handled (its 7th field), set before each; every event of
-- that order carries it.
local actor

local function count_sold(rec, units, alloc, first_sku, m)
  if m == 0 then return end
  local usk, per = cjson.decode(rec.usk), {}
  for _, a in ipairs(alloc) do
    local j = usk[a[1]]
    per[j] = (per[j] or 0) + a[3]
  end
  for j = 1, m do
    if per[j] then
      local sku = nil
      for u, uj in ipairs(usk) do if uj == j then sku = units[u][1] break end end
      sku_add_sold(KEYS[first_sku + j - 1], sku, now, CFG_POL, per[j])
    end
  end
end

-- A record's allocations as event payload: [[sku, spec, barcode, warehouse, qty]].
local function payload_of(units, alloc)
  local out = {}
  for i, a in ipairs(alloc) do
    local u = units[a[1]]
    out[i] = {u[1], u[2], u[3], a[2], a[3]}
  end
  return out
end

-- The record as read (`flat`, HGETALL) with fields set since: the reply's record.
local function with_fields(flat, ...)
  local n = #flat
  for i, v in ipairs({...}) do flat[n + i] = v end
  return flat
end

-- A HELD record's reserved stock leaves its counters: back to available unless `to` is C.
-- `first_stock`: the record's stock keys start there in KEYS. Refused (nothing written) when
-- a reserved counter is below the hold.
local function stock_back(rec, alloc, first_stock, to)
  for _, a in ipairs(alloc) do
    local r = tonumber(redis.call('HGET', KEYS[first_stock + a[1] - 1], 'r:' .. a[2])) or 0
    if r < a[3] then return {err = 'INTERNAL', meta = {detail = 'reserved counter below hold'}} end
  end
  for _, a in ipairs(alloc) do
    local key, wh, q_s = KEYS[first_stock + a[1] - 1], a[2], string.format('%d', a[3])
    redis.call('HINCRBY', key, 'r:' .. wh, '-' .. q_s)
    if to ~= 'C' then redis.call('HINCRBY', key, 'a:' .. wh, q_s) end
  end
  return nil
end

-- Move a HELD record to `to` (C, R or E): stock back (or sold), out of the expiry index, one
-- event. `first_stock`: the record's stock keys start there in KEYS (checked equal).
local function apply(rec, flat, rk, xk, ek, first_stock, to, extra_field, extra, first_sku, m,
                     more)
  local alloc, units = cjson.decode(rec.alloc), cjson.decode(rec.units)
  if rec.parts then
    -- the stock is in the parts, settled after this call (see the header)
    redis.call('ZADD', settle_index(xk), string.format('%d', now + CFG_RECOVER_MS), rec.oid)
  else
    local err = stock_back(rec, alloc, first_stock, to)
    if err then return err end
    if to == 'C' then count_sold(rec, units, alloc, first_sku, m) end
  end
  rec.st, rec.up = to, now_s
  if extra_field then
    rec[extra_field] = extra
    redis.call('HSET', rk, 'st', to, 'up', now_s, extra_field, extra)
    with_fields(flat, 'st', to, 'up', now_s, extra_field, extra)
  else
    redis.call('HSET', rk, 'st', to, 'up', now_s)
    with_fields(flat, 'st', to, 'up', now_s)
  end
  redis.call('ZREM', xk, rec.oid)
  redis.call('PEXPIRE', rk, CFG_RETENTION_S)
  if rec.nc then return {ok = 1, changed = 1, flat = flat} end  -- a part: no event
  local etype = ({C = 'ORDER_COMMITTED', R = 'ORDER_RELEASED', E = 'ORDER_EXPIRED'})[to]
  local data = {allocations = payload_of(units, alloc)}
  if extra_field then data[extra_field == 'pref' and 'payment_ref' or 'reason'] = extra end
  if more then
    for k, v in pairs(more) do data[k] = v end
  end
  emit(ek, CFG_MAXLEN, etype, 'order_id', rec.oid, now_s, data, actor)
  return {ok = 1, changed = 1, flat = flat}
end

-- ReportPayment (op "pay"). arg: {"prov": provider, "tx": transaction id ("" allowed unless
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
local function report_one(arg, rec, flat, rk, xk, ek, first_stock, first_sku, m, pk)
  local p = cjson.decode(arg)
  local tfield = 't:' .. p.prov .. ':' .. (p.tx ~= '' and p.tx or ('~' .. p.status))
  local stored = redis.call('HGET', rk, tfield)
  if stored then
    local answer = cjson.decode(stored)
    if answer.err then return {err = answer.err, meta = answer.meta} end
    return {ok = 1, changed = 0, replayed = 1, flat = flat}
  end
  local st, due = rec.st, now >= tonumber(rec.dl)
  local amt = tonumber(rec.amt) or 0
  local oid, maxlen = rec.oid, CFG_MAXLEN
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
    if redis.call('HGET', rk, 'st') ~= 'H' then redis.call('PEXPIRE', rk, CFG_RETENTION_S) end
    return {ok = 1, changed = 1, replayed = 0, flat = redis.call('HGETALL', rk)}
  end
  local function flagged(flag, reason, extra)
    local data = {flag = flag, reason = reason, payment = info}
    for k, v in pairs(extra or {}) do data[k] = v end
    emit(ek, maxlen, 'PAYMENT_FLAGGED', 'order_id', oid, now, data, actor)
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
      local r = apply(rec, flat, rk, xk, ek, first_stock, 'C', 'pref', p.tx, first_sku, m,
        {payment = info})
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
      local r = apply(rec, flat, rk, xk, ek, first_stock, 'E')
      if r.err then return r end
    end
    local alloc, enough = cjson.decode(rec.alloc), true
    -- Cluster: an order whose stock spans slots is not taken again in one call: flagged
    -- REFUND (docs/cluster.md).
    if rec.parts then enough = false end
    for _, a in ipairs(enough and alloc or {}) do
      if (tonumber(redis.call('HGET', KEYS[first_stock + a[1] - 1], 'a:' .. a[2])) or 0) < a[3] then
        enough = false
        break
      end
    end
    local units = cjson.decode(rec.units)
    local data = {allocations = payload_of(units, alloc), payment = info, recommitted = enough}
    local fields
    if enough then
      for _, a in ipairs(alloc) do
        redis.call('HINCRBY', KEYS[first_stock + a[1] - 1], 'a:' .. a[2], -a[3])
      end
      count_sold(rec, units, alloc, first_sku, m)
      fields = with(paid, 'plate', now_s)
    else
      data.flag = 'REFUND'
      fields = with(paid, 'pflag', 'REFUND')
    end
    emit(ek, maxlen, 'PAYMENT_AFTER_EXPIRY', 'order_id', oid, now, data, actor)
    return settle({ok = 1}, fields)
  end
  -- FAILED / CLOSED
  if st == 'H' then
    local r
    if due then
      r = apply(rec, flat, rk, xk, ek, first_stock, 'E')
    else
      r = apply(rec, flat, rk, xk, ek, first_stock, 'R', 'why', 'payment ' .. p.status, nil, nil,
        {payment = info})
    end
    if r.err then return r end
    return settle({ok = 1}, {'pst', p.status, 'ptx', p.tx})
  end
  -- finished already: nothing to undo
  return settle({ok = 1}, rec.pst == 'PENDING' and {'pst', p.status} or {})
end

-- One order: b is its first ARGV field - 1, g its first KEYS entry - 1.
local function transition_one(b, g, n, m)
  local op, rk = ARGV[b + 1], KEYS[g + 1]
  local xk, ek, first_stock = KEYS[g + 2], KEYS[g + 3], g + 4
  local flat = redis.call('HGETALL', rk)
  if #flat == 0 then return {err = 'RESERVATION_NOT_FOUND'} end
  local rec = hash_table(flat)
  -- KEYS came from these texts: equal texts, equal keys.
  if rec.keys ~= ARGV[b + 4] or (rec.skeys or '') ~= ARGV[b + 5] then
    return {err = 'KEYS_CHANGED'}
  end
  local first_sku = first_stock + n
  if op == 'pay' then
    return report_one(ARGV[b + 6], rec, flat, rk, xk, ek, first_stock, first_sku, m,
      KEYS[first_sku + m])
  end
  local st, due = rec.st, now >= tonumber(rec.dl)
  if op == 'part' then
    local to = ARGV[b + 6]
    if st ~= 'H' then return {ok = 1, changed = 0, flat = flat} end
    return apply(rec, flat, rk, xk, ek, first_stock, to, nil, nil, first_sku, m)
  end
  if op == 'undo' then
    if st ~= 'H' or rec.nc ~= ARGV[b + 6] then return {ok = 1, changed = 0, flat = flat} end
    local err = stock_back(rec, cjson.decode(rec.alloc), first_stock, 'R')
    if err then return err end
    redis.call('DEL', rk)
    redis.call('ZREM', xk, rec.oid)
    return {ok = 1, changed = 1, flat = {}}
  end
  if op == 'expire' then
    if st ~= 'H' or not due then return {ok = 1, changed = 0, flat = flat} end
    local r = apply(rec, flat, rk, xk, ek, first_stock, 'E')
    if r.err then return {ok = 1, changed = 0, flat = flat, stuck = 1} end
    return r
  end
  if op == 'commit' then
    if st == 'C' then return {ok = 1, changed = 0, flat = flat} end
    if st == 'R' then return {err = 'RESERVATION_RELEASED'} end
    if st == 'H' and due then
      -- the deadline decided first: expire it now, then refuse
      local r = apply(rec, flat, rk, xk, ek, first_stock, 'E')
      if r.err then return r end
    end
    if st == 'E' or due then return {err = 'RESERVATION_EXPIRED'} end
    return apply(rec, flat, rk, xk, ek, first_stock, 'C', 'pref', ARGV[b + 6], first_sku, m)
  end
  -- release
  if st == 'R' or st == 'E' then return {ok = 1, changed = 0, flat = flat} end
  if st == 'C' then return {err = 'RESERVATION_COMMITTED'} end
  if due then return apply(rec, flat, rk, xk, ek, first_stock, 'E') end
  return apply(rec, flat, rk, xk, ek, first_stock, 'R', 'why', ARGV[b + 6])
end

local FLAG = {[0] = '0', [1] = '1'}
local results = {}
local b, g = 1, 0
while b < #ARGV do
  local n, m, x = string.byte(ARGV[b + 3], 1, 3)
  actor = ARGV[b + 7]
  local r = transition_one(b, g, n, m)
  if r.err then
    results[#results + 1] = '[0,"' .. r.err .. '",' .. (r.meta and cjson.encode(r.meta) or 'null')
      .. ']'
  else
    -- a finished cross-slot order whose parts may not have followed yet (still in the
    -- settle index): settling 1, and the caller settles them before answering
    local settling = 0
    if (r.changed or 0) == 0 and r.flat[1] then
      local t = hash_table(r.flat)
      if t.parts and t.st ~= 'H'
          and redis.call('ZSCORE', settle_index(KEYS[g + 2]), t.oid) then
        settling = 1
      end
    end
    results[#results + 1] = '[1,' .. FLAG[r.changed or 0] .. ',' .. cjson.encode(r.flat) .. ','
      .. FLAG[r.replayed or 0] .. ',' .. FLAG[r.stuck or 0] .. ',' .. FLAG[settling] .. ']'
  end
  g = g + 3 + n + m + x
  b = b + 7
end
return '[' .. table.concat(results, ',') .. ']'
