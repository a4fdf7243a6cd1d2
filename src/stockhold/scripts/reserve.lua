-- reserve.lua: hold stock for a batch of orders; each order is all-or-nothing on its own.
--
-- KEYS, one group per order, groups back to back:
--   [g+1] the order's reservation record (hash)
--   [g+2] the expiry index (zset) of the order's partition
--   [g+3] the event stream of the order's partition
--   [g+4 .. g+3+n] the stock hashes of the order's n distinct sales units
--   [g+4+n .. g+3+n+m] the policy hashes of the order's m distinct SKUs
--   with "pay" only: [g+4+n+m] the poll index (zset) of the order's partition,
--                    [g+5+n+m] the out_trade_no -> order id map key of the payment
-- ARGV[1]   JSON header: {"maxlen": int, "priority": [warehouse, ...], "dhold": seconds,
--             "pol": {"thr": units, "bms": bucket ms, "nb": buckets},
--             "pay": {"steps": [ms, ...], "margin": ms, "ttl": ms} (payment polls)}
-- ARGV[1+i] JSON of order i: {"oid": str, "fp": str, "hold": seconds (0: policy/default),
--             "units": [[sku, spec, barcode], ...]   (parallel to the n stock keys),
--             "us": [SKU index 1..m of each unit], "m": int,
--             "lines": [[unit index 1..n, warehouse or "", quantity], ...],
--             "amt": amount in minor units (optional, 0: not given),
--             "pay": [provider, out_trade_no] (optional: mark it payment-pending)}
-- Returns a JSON array, one entry per order:
--   {"ok": 1, "replayed": 0|1, "rec": record, "pol": [[timeout ms, hot 0|1, pinned 0|1], ...]}
--   or {"err": REASON, "meta": {...}, "pol": [...]}; "pol" is per SKU, in KEYS order, and
--   absent only for ORDER_CONFLICT.
-- Hold length: the order's own, else the shortest stored hold among its SKUs, else dhold.
-- A line above its SKU's max_line_quantity is refused as INVALID_ARGUMENT (meta: line, max).
-- An order is checked completely before its first write; a refused order writes nothing.
-- An out_trade_no already mapped to another order is refused as PAYMENT_CONFLICT.

local header = cjson.decode(ARGV[1])
local prio = {}
for i, wh in ipairs(header.priority) do prio[wh] = i end
local now = now_ms()
local results = {}
local base = 0

local function load_stock(key)
  local flat = redis.call('HGETALL', key)
  local avail, whs = {}, {}
  for j = 1, #flat, 2 do
    local f = flat[j]
    if string.sub(f, 1, 2) == 'a:' then
      local wh = string.sub(f, 3)
      avail[wh] = tonumber(flat[j + 1])
      whs[#whs + 1] = wh
    end
  end
  return {avail = avail, whs = whs}
end

local function insufficient_err(unit, wh, requested, available)
  return {err = 'INSUFFICIENT_STOCK', meta = {sku = unit[1], spec = unit[2], barcode = unit[3],
    warehouse = wh, requested = requested, available = available}}
end

local function policies(first_sku, m)
  local states, pol = {}, {}
  for j = 1, m do
    local st = sku_state(KEYS[first_sku + j - 1], now, header.pol)
    states[j] = st
    pol[j] = {st.to, st.hot and 1 or 0, st.pin and 1 or 0}
  end
  return states, pol
end

local function reserve_one(o, rk, xk, ek, first_stock)
  local existing = redis.call('HGET', rk, 'fp')
  if existing and existing ~= o.fp then
    return {err = 'ORDER_CONFLICT', meta = {order_id = o.oid}}
  end
  local n = #o.units
  local first_sku = first_stock + n
  local states, pol = policies(first_sku, o.m)
  if existing then
    return {ok = 1, replayed = 1, rec = hash_table(redis.call('HGETALL', rk)), pol = pol}
  end
  for i, l in ipairs(o.lines) do
    local st = states[o.us[l[1]]]
    if st.maxq > 0 and l[3] > st.maxq then
      return {err = 'INVALID_ARGUMENT', pol = pol, meta = {line = i - 1, max = st.maxq,
        sku = o.units[l[1]][1], requested = l[3]}}
    end
  end
  local hold = o.hold
  if hold == 0 then
    for _, st in ipairs(states) do
      if st.hold > 0 and (hold == 0 or st.hold < hold) then hold = st.hold end
    end
    if hold == 0 then hold = header.dhold end
  end
  local function insufficient(unit, wh, requested, available)
    local e = insufficient_err(unit, wh, requested, available)
    e.pol = pol
    return e
  end
  local stock, need = {}, {}
  for u = 1, n do
    stock[u] = load_stock(KEYS[first_stock + u - 1])
    need[u] = {}
  end
  -- Allocations in first-appearance order of (unit, warehouse).
  local order, seen = {}, {}
  local function take(u, wh, q)
    need[u][wh] = (need[u][wh] or 0) + q
    local tag = u .. '\0' .. wh
    if not seen[tag] then
      seen[tag] = true
      order[#order + 1] = {u, wh}
    end
  end
  -- Lines naming a warehouse first: lines for the same unit and warehouse count as their sum.
  for _, l in ipairs(o.lines) do
    if l[2] ~= '' then take(l[1], l[2], l[3]) end
  end
  for _, l in ipairs(o.lines) do
    local u, wh = l[1], l[2]
    if wh ~= '' then
      local a = stock[u].avail[wh] or 0
      if need[u][wh] > a then return insufficient(o.units[u], wh, need[u][wh], a) end
    end
  end
  -- Lines without a warehouse, summed per unit: the first warehouse (priority, then most
  -- available, then name) that covers the whole sum, else a split in that order.
  local auto, auto_units = {}, {}
  for _, l in ipairs(o.lines) do
    local u = l[1]
    if l[2] == '' then
      if not auto[u] then auto_units[#auto_units + 1] = u end
      auto[u] = (auto[u] or 0) + l[3]
    end
  end
  for _, u in ipairs(auto_units) do
    local q = auto[u]
    local avail = stock[u].avail
    local function rem(w) return avail[w] - (need[u][w] or 0) end
    local cand = {}
    for i, w in ipairs(stock[u].whs) do cand[i] = w end
    table.sort(cand, function(x, y)
      local px, py = prio[x] or 1e9, prio[y] or 1e9
      if px ~= py then return px < py end
      local rx, ry = rem(x), rem(y)
      if rx ~= ry then return rx > ry end
      return x < y
    end)
    local picked, total = nil, 0
    for _, w in ipairs(cand) do
      local r = rem(w)
      if r >= q then picked = w break end
      if r > 0 then total = total + r end
    end
    if picked then
      take(u, picked, q)
    elseif total < q then
      return insufficient(o.units[u], '', q, total)
    else
      local left = q
      for _, w in ipairs(cand) do
        local r = rem(w)
        if r > 0 then
          local t = math.min(r, left)
          take(u, w, t)
          left = left - t
          if left == 0 then break end
        end
      end
    end
  end
  local pk, mk
  if o.pay then
    pk, mk = KEYS[first_sku + o.m], KEYS[first_sku + o.m + 1]
    local conflict = payment_conflict(mk, o.oid, o.pay[2])
    if conflict then
      conflict.pol = pol
      return conflict
    end
  end
  -- Everything checked: write.
  local keys, alloc, payload = {}, {}, {}
  for u = 1, n do keys[u] = KEYS[first_stock + u - 1] end
  for i, a in ipairs(order) do
    local u, wh = a[1], a[2]
    local q = need[u][wh]
    redis.call('HINCRBY', keys[u], 'a:' .. wh, -q)
    redis.call('HINCRBY', keys[u], 'r:' .. wh, q)
    alloc[i] = {u, wh, q}
    local unit = o.units[u]
    payload[i] = {unit[1], unit[2], unit[3], wh, q}
  end
  local skeys = {}
  for j = 1, o.m do skeys[j] = KEYS[first_sku + j - 1] end
  local deadline = now + hold * 1000
  local rec = {st = 'H', oid = o.oid, fp = o.fp, cr = now, dl = deadline, hold = hold,
    keys = cjson.encode(keys), units = cjson.encode(o.units), alloc = cjson.encode(alloc),
    skeys = cjson.encode(skeys), usk = cjson.encode(o.us)}
  redis.call('HSET', rk, 'st', rec.st, 'oid', rec.oid, 'fp', rec.fp, 'cr', rec.cr,
    'dl', rec.dl, 'hold', rec.hold, 'keys', rec.keys, 'units', rec.units, 'alloc', rec.alloc,
    'skeys', rec.skeys, 'usk', rec.usk)
  redis.call('ZADD', xk, deadline, o.oid)
  local data = {allocations = payload, expires_at = deadline}
  local amt = o.amt or 0
  if amt > 0 then
    rec.amt = amt
    data.amount = amt
    redis.call('HSET', rk, 'amt', amt)
  end
  if o.pay then
    local first = start_polling(rk, pk, mk, o.oid, o.pay[1], o.pay[2], now, deadline, header.pay)
    rec.pprov, rec.potn, rec.pst, rec.polls, rec.pnext = o.pay[1], o.pay[2], 'PENDING', 0, first
    data.payment = {provider = o.pay[1], out_trade_no = o.pay[2], next_poll_at = first}
  end
  emit(ek, header.maxlen, 'ORDER_RESERVED', 'order_id', o.oid, now, data)
  return {ok = 1, replayed = 0, rec = rec, pol = pol}
end

for i = 2, #ARGV do
  local o = cjson.decode(ARGV[i])
  results[i - 1] = reserve_one(o, KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], base + 4)
  base = base + 3 + #o.units + o.m + (o.pay and 2 or 0)
end
return cjson.encode(results)
