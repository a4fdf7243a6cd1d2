-- reserve.lua: hold stock for a batch of orders; each order is all-or-nothing on its own.
--
-- KEYS, one group per order, groups back to back:
--   [g+1] the order's reservation record (hash)
--   [g+2] the expiry index (zset) of the order's partition
--   [g+3] the event stream of the order's partition
--   [g+4 .. g+3+n] the stock hashes of the order's n distinct sales units
--   [g+4+n .. g+3+n+m] the policy hashes of the order's m distinct SKUs
--   with a payment only: [g+4+n+m] the poll index (zset) of the order's partition,
--                        [g+5+n+m] the out_trade_no -> order id map key of the payment
-- ARGV[1] the configuration id the call was built for (CONFIG_ID, see stockhold.scripts).
-- Then per order, plain fields back to back (nothing to decode; numbers as decimal text):
--   oid, fp, hold (seconds, 0: policy/default),
--   counts: 4 bytes n, m, l (lines), flags (1: amount given, 2: payment to poll, or both;
--     4 alone: a part, see below),
--   keys, skeys, usk: the record's fields as JSON text (stock keys, SKU keys, SKU index 1..m
--     of each unit), stored as they come,
--   actor: who reserves (the ORDER_RESERVED event's actor; a part writes no event),
--   amt (minor units; flag 1 only), provider, out_trade_no (flag 2 only), nonce (flag 4 only),
--   n units: each its sku, spec and barcode as JSON strings, comma-separated, without the
--     brackets of an array (it is spliced into the record's "units" and the event's
--     allocations),
--   l lines: unit index 1..n, warehouse ('': any), quantity; 3 fields each.
-- Returns one JSON text, built as text (no cjson, no tables for Redis to convert):
--   [Redis now (ms), entry of order 1, entry of order 2, ...], each entry an array:
--   [1, pol, deadline ms, alloc, first payment poll ms or 0]   held now (created = now)
--   [2, pol, record]    replayed: the stored record, flat [field, value, ...] as HGETALL gives
--   [0, pol, REASON, meta]    refused, nothing written
--   pol: flat [timeout ms, hot 0|1, pinned 0|1] per SKU, in KEYS order; empty only for
--   ORDER_CONFLICT. alloc: [[unit index, warehouse, quantity], ...], the record's "alloc".
-- Hold length: the order's own, else the shortest stored hold among its SKUs, else the default.
-- A line above its SKU's max_line_quantity is refused as INVALID_ARGUMENT (meta: line, max).
-- An order is checked completely before its first write; a refused order writes nothing.
-- An out_trade_no already mapped to another order is refused as PAYMENT_CONFLICT.
-- The record layout is the one transition.lua, expire.lua, extend.lua and get.lua read.
-- A part (flag 4; Redis Cluster, an order whose keys span slots: docs/cluster.md) holds the
-- order's lines whose stock is in this slot: the same record, but at the part key
-- ("<tag>part:<order id>") with the attempt's nonce ("nc"), indexed in the partition's parts
-- index (KEYS[g+2]) at now + the recovery window instead of the expiry index, and no event:
-- the order's home record (finish.lua) has those.
--
-- Cost (docs/performance.md, "Redis cost per script call"): numbers that Redis would format
-- with printf are passed on as the text they came in, or formatted once per call; nothing is
-- JSON-decoded or encoded on the way of a hold; few tables are made per order.

if ARGV[1] ~= CONFIG_ID then
  return redis.error_reply('STOCKHOLD_CONFIG reserve.lua built for configuration ' .. CONFIG_ID
    .. ', called for ' .. tostring(ARGV[1]))
end

-- Globals read per order, as locals (a global is a table lookup on every use).
local KEYS, ARGV, call, tonumber, format = KEYS, ARGV, redis.call, tonumber, string.format

local now, now_s = now_ms()
local deadlines = {}  -- hold seconds -> deadline text

local function refused(pol, reason, meta)
  return '[0,[' .. pol .. '],"' .. reason .. '",' .. cjson.encode(meta) .. ']'
end

local function insufficient(pol, unit, wh, requested, available)
  local u = cjson.decode('[' .. unit .. ']')
  return refused(pol, 'INSUFFICIENT_STOCK', {sku = u[1], spec = u[2], barcode = u[3],
    warehouse = wh, requested = requested, available = available})
end

-- The allocations of an order, flat, 5 slots each: unit index, its text, warehouse, quantity,
-- the quantity's text while one line alone makes it (the line's own: not reformatted); the
-- available-stock field of a checked named warehouse goes in a sixth slot.
-- Lines for the same unit and warehouse count as their sum. Returns the new count.
local function take(al, na, u, u_s, wh, q, q_s)
  for k = 1, 6 * na, 6 do
    if al[k] == u and al[k + 2] == wh then
      al[k + 3], al[k + 4] = al[k + 3] + q, nil
      return na
    end
  end
  local k = 6 * na
  al[k + 1], al[k + 2], al[k + 3], al[k + 4], al[k + 5] = u, u_s, wh, q, q_s
  return na + 1
end

-- What the allocations already take of a unit's warehouse.
local function taken(al, na, u, wh)
  for k = 1, 6 * na, 6 do
    if al[k] == u and al[k + 2] == wh then return al[k + 3] end
  end
  return 0
end

-- Every warehouse of a unit: its available stock and the warehouse names.
local function all_stock(key)
  local flat = call('HGETALL', key)
  local avail, whs = {}, {}
  for j = 1, #flat, 2 do
    local f = flat[j]
    if string.sub(f, 1, 2) == 'a:' then
      local wh = string.sub(f, 3)
      avail[wh] = tonumber(flat[j + 1])
      whs[#whs + 1] = wh
    end
  end
  return avail, whs
end

-- Lines without a warehouse, summed per unit: the first warehouse (priority, then most
-- available, then name) that covers the unit's whole sum, else a split in that order.
-- Returns the new allocation count, or nil and the refusal.
local function allocate_auto(al, na, u, u_s, q, key, unit, pol)
  local avail, whs = all_stock(key)
  local function rem(w) return avail[w] - taken(al, na, u, w) end
  table.sort(whs, function(x, y)
    local px, py = CFG_PRIORITY[x] or 1e9, CFG_PRIORITY[y] or 1e9
    if px ~= py then return px < py end
    local rx, ry = rem(x), rem(y)
    if rx ~= ry then return rx > ry end
    return x < y
  end)
  local total = 0
  for _, w in ipairs(whs) do
    local r = rem(w)
    if r >= q then return take(al, na, u, u_s, w, q, nil) end
    if r > 0 then total = total + r end
  end
  if total < q then return nil, insufficient(pol, unit, '', q, total) end
  local left = q
  for _, w in ipairs(whs) do
    local r = rem(w)
    if r > 0 then
      local t = math.min(r, left)
      na = take(al, na, u, u_s, w, t, nil)
      left = left - t
      if left == 0 then break end
    end
  end
  return na
end

-- One order: b is its first ARGV field - 1, g its first KEYS entry - 1, f its units' first
-- ARGV field - 1 (after the optional fields). Returns the order's reply entry (JSON text).
local function reserve_one(b, g, f, n, m, l, flags, part)
  local oid, fp = ARGV[b + 1], ARGV[b + 2]
  local rk = KEYS[g + 1]
  local existing = call('HGET', rk, 'fp')
  if existing and existing ~= fp then
    return refused('', 'ORDER_CONFLICT', {order_id = oid})
  end
  local first_stock, first_sku, lb = g + 4, g + 4 + n, f + n
  -- Policies: pol for the reply (as text), max line quantities and the shortest hold.
  local pol, maxq, hold, hold_s = '', nil, 0, nil
  for j = 1, m do
    local v, _, hot = sku_read(KEYS[first_sku + j - 1], now, CFG_POL)
    -- v[1] is the timeout as policy_set.lua stored it: a plain integer, valid JSON.
    pol = pol .. (j > 1 and ',' or '') .. (v[1] or '0') .. (hot and ',1' or ',0')
      .. (v[5] == '1' and ',1' or ',0')
    if v[3] then
      maxq = maxq or {}
      maxq[j] = tonumber(v[3])
    end
    local h = tonumber(v[2]) or 0
    if h > 0 and (hold == 0 or h < hold) then hold, hold_s = h, v[2] end
  end
  if existing then
    return '[2,[' .. pol .. '],' .. cjson.encode(call('HGETALL', rk)) .. ']'
  end
  local usk = maxq and cjson.decode(ARGV[b + 7])
  -- Lines naming a warehouse first, then the rest summed per unit (allocate_auto).
  local al, na, auto, auto_units = {}, 0, nil, nil
  for i = 1, l do
    local x = lb + 3 * i
    local u_s, wh, q_s = ARGV[x - 2], ARGV[x - 1], ARGV[x]
    local u, q = tonumber(u_s), tonumber(q_s)
    if maxq then
      local mq = maxq[usk[u]]
      if mq and mq > 0 and q > mq then
        local unit = cjson.decode('[' .. ARGV[f + u] .. ']')
        return refused(pol, 'INVALID_ARGUMENT', {line = i - 1, max = mq, sku = unit[1],
          requested = q})
      end
    end
    if wh ~= '' then
      na = take(al, na, u, u_s, wh, q, q_s)
    else
      if not auto then auto, auto_units = {}, {} end
      if not auto[u] then
        auto_units[#auto_units + 1] = u
        auto[u] = {0, u_s}
      end
      auto[u][1] = auto[u][1] + q
    end
  end
  if ARGV[b + 3] ~= '0' then hold_s = ARGV[b + 3] hold = tonumber(hold_s) end
  if hold == 0 then hold, hold_s = CFG_DHOLD, CFG_DHOLD_S end
  for k = 1, 6 * na, 6 do
    local u, wh, q = al[k], al[k + 2], al[k + 3]
    local field = 'a:' .. wh
    local a = tonumber(call('HGET', KEYS[first_stock + u - 1], field)) or 0
    if q > a then return insufficient(pol, ARGV[f + u], wh, q, a) end
    al[k + 5] = field
  end
  if auto then
    for _, u in ipairs(auto_units) do
      local err
      na, err = allocate_auto(al, na, u, auto[u][2], auto[u][1], KEYS[first_stock + u - 1],
        ARGV[f + u], pol)
      if not na then return err end
    end
  end
  local amt_s, prov, otn, pk, mk = '0', '', '', nil, nil
  if flags % 2 == 1 then amt_s = ARGV[b + 9] end
  if flags == 2 or flags == 3 then
    prov, otn = ARGV[f - 1], ARGV[f]
    pk, mk = KEYS[first_sku + m], KEYS[first_sku + m + 1]
    local conflict = payment_conflict(mk, oid, otn)
    if conflict then return refused(pol, conflict.err, conflict.meta) end
  end
  -- Everything checked: write.
  local alloc, payload = '', ''
  for k = 1, 6 * na, 6 do
    local u, wh = al[k], al[k + 2]
    local key = KEYS[first_stock + u - 1]
    local q_s = al[k + 4] or format('%d', al[k + 3])
    call('HINCRBY', key, al[k + 5] or ('a:' .. wh), '-' .. q_s)
    call('HINCRBY', key, 'r:' .. wh, q_s)
    local jwh, sep = json_str(wh), k > 1 and ',' or ''
    alloc = alloc .. sep .. '[' .. al[k + 1] .. ',' .. jwh .. ',' .. q_s .. ']'
    payload = payload .. sep .. '[' .. ARGV[f + u] .. ',' .. jwh .. ',' .. q_s .. ']'
  end
  alloc = '[' .. alloc .. ']'
  local units = '[[' .. ARGV[f + 1]
  for u = 2, n do units = units .. '],[' .. ARGV[f + u] end
  local dl = now + hold * 1000
  local dl_s = deadlines[hold]
  if not dl_s then
    dl_s = format('%d', dl)
    deadlines[hold] = dl_s
  end
  local data = '{"allocations":[' .. payload .. '],"expires_at":' .. dl_s
  if part then
    call('HSET', rk, 'st', 'H', 'oid', oid, 'fp', fp, 'cr', now_s, 'dl', dl_s,
      'hold', hold_s, 'keys', ARGV[b + 5], 'units', units .. ']]', 'alloc', alloc,
      'skeys', ARGV[b + 6], 'usk', ARGV[b + 7], 'nc', ARGV[b + 9])
    call('ZADD', KEYS[g + 2], format('%d', now + CFG_RECOVER_MS), oid)
    return '[1,[' .. pol .. '],' .. dl_s .. ',' .. alloc .. ',0]'
  elseif amt_s ~= '0' then
    call('HSET', rk, 'st', 'H', 'oid', oid, 'fp', fp, 'cr', now_s, 'dl', dl_s,
      'hold', hold_s, 'keys', ARGV[b + 5], 'units', units .. ']]', 'alloc', alloc,
      'skeys', ARGV[b + 6], 'usk', ARGV[b + 7], 'amt', amt_s)
    data = data .. ',"amount":' .. amt_s
  else
    call('HSET', rk, 'st', 'H', 'oid', oid, 'fp', fp, 'cr', now_s, 'dl', dl_s,
      'hold', hold_s, 'keys', ARGV[b + 5], 'units', units .. ']]', 'alloc', alloc,
      'skeys', ARGV[b + 6], 'usk', ARGV[b + 7])
  end
  call('ZADD', KEYS[g + 2], dl_s, oid)
  local first_s = '0'
  if prov ~= '' then
    first_s = format('%d', start_polling(rk, pk, mk, oid, prov, otn, now, dl, CFG_PAY()))
    data = data .. ',"payment":{"provider":' .. json_str(prov) .. ',"out_trade_no":'
      .. json_str(otn) .. ',"next_poll_at":' .. first_s .. '}'
  end
  emit(KEYS[g + 3], CFG_MAXLEN, 'ORDER_RESERVED', 'order_id', oid, now_s, data .. '}',
    ARGV[b + 8])
  return '[1,[' .. pol .. '],' .. dl_s .. ',' .. alloc .. ',' .. first_s .. ']'
end

local results = {'[' .. now_s}
local b, g = 1, 0
while b < #ARGV do
  local n, m, l, flags = string.byte(ARGV[b + 4], 1, 4)
  -- the optional fields: amount (flag 1), provider and out_trade_no (flag 2)
  local pay, part = flags == 2 or flags == 3, flags == 4
  local f = b + 8 + flags % 2 + (pay and 2 or 0) + (part and 1 or 0)
  results[#results + 1] = reserve_one(b, g, f, n, m, l, flags, part)
  g = g + 3 + n + m + (pay and 2 or 0)
  b = f + n + 3 * l
end
return table.concat(results, ',') .. ']'
