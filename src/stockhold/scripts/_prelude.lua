-- _prelude.lua: helpers prepended to every operation script by stockhold.scripts (not a script
-- of its own). Everything here is local to the script that includes it.

-- Milliseconds on Redis's own clock (the only clock stockhold trusts), and the same as text:
-- the seconds' text followed by the first three of the six microsecond digits, so no number
-- is formatted.
local function now_ms()
  local t = redis.call('TIME')
  local text = t[1] .. string.sub('00000' .. t[2], -6, -4)
  return tonumber(text), text
end

-- HGETALL reply -> table.
local function hash_table(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

-- Append one event to a partition stream, trimmed to about maxlen entries. `data` is a table,
-- or its JSON text already encoded (the reserve path builds it as text: cheaper than cjson).
-- `actor`: who caused it (the caller's identity, or "sweeper", "poller", "webhook",
-- "recovery", "reconcile": constants.ACTOR_*), in the entry's field 'actor'.
local function emit(stream, maxlen, etype, id_field, id, now, data, actor)
  if type(data) ~= 'string' then data = cjson.encode(data) end
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
    'type', etype, id_field, id, 'ts', now, 'data', data, 'actor', actor)
end

-- A string as a JSON string literal: quoted as is when nothing in it needs escaping (the
-- common case, and no cjson call), else through cjson.
local function json_str(s)
  if string.find(s, '[%c"\\]') then return cjson.encode(s) end
  return '"' .. s .. '"'
end

-- A reservation record's allocations as event payload: [[sku, spec, barcode, warehouse, qty]].
local function alloc_payload(rec)
  local units, alloc, out = cjson.decode(rec.units), cjson.decode(rec.alloc), {}
  for i, a in ipairs(alloc) do
    local u = units[a[1]]
    out[i] = {u[1], u[2], u[3], a[2], a[3]}
  end
  return out
end


-- SKU policy and trailing sales, in the SKU's hash (see constants.py). `p` is the header's
-- {thr = hot threshold (units committed in the window), bms = bucket ms, nb = buckets}.
-- Sales are counted in buckets "b:<index>" (index = floor(ms / bms)); "sold" is the sum of the
-- buckets present and "old" a lower bound of their indexes, so the trailing sum is exact
-- after subtracting the buckets that fell out of the window (at most nb of them).
local function stale_buckets(old, now, p)
  local cutoff = math.floor(now / p.bms) - p.nb + 1
  if not old or old >= cutoff then return nil, cutoff end
  local fields = {}
  for i = old, math.min(cutoff - 1, old + p.nb - 1) do fields[#fields + 1] = 'b:' .. i end
  return fields, cutoff
end

-- Read-only: a SKU hash's fields as HMGET returns them (false where absent): [1] timeout ms,
-- [2] hold s, [3] max line quantity, [4] hot flag, [5] pinned, [6] stored, [7] updated ms,
-- [8] sold, [9] oldest bucket; then the units sold in the window and whether it is hot now.
local function sku_read(key, now, p)
  local v = redis.call('HMGET', key, 'to', 'hold', 'maxq', 'hot', 'pin', 'set', 'up', 'sold', 'old')
  local sold = tonumber(v[8]) or 0
  if sold > 0 then
    local stale = stale_buckets(tonumber(v[9]), now, p)
    if stale then
      for _, q in ipairs(redis.call('HMGET', key, unpack(stale))) do
        sold = sold - (tonumber(q) or 0)
      end
    end
  end
  local hot
  if v[5] == '1' then hot = v[4] == '1' else hot = sold > p.thr end
  return v, sold, hot
end

-- Read-only: the SKU's stored policy and whether it is hot now.
local function sku_state(key, now, p)
  local v, sold, hot = sku_read(key, now, p)
  return {to = tonumber(v[1]) or 0, hold = tonumber(v[2]) or 0, maxq = tonumber(v[3]) or 0,
    hot_flag = v[4] == '1', pin = v[5] == '1', stored = v[6] == '1', up = tonumber(v[7]) or 0,
    sold = sold, hot = hot}
end

-- The partition tag "<prefix>:{p<N>}:" that every key of a partition starts with (ids in keys
-- are escaped: no braces after it).
local function tag_of(key)
  return string.match(key, '^(.*{p%d+}:)')
end

-- The SKU index (zset) of a SKU hash's partition: "<prefix>:{p<N>}:sku:<sku>" ->
-- "<prefix>:{p<N>}:skus", in the hash's own slot (constants.py).
local function sku_index(key)
  return tag_of(key) .. 'skus'
end

-- Count q committed units of a SKU now: drop the buckets that left the window, add to the
-- current one. A SKU hash without a stored policy lives one window past its last sale.
local function sku_add_sold(key, sku, now, p, q)
  local v = redis.call('HMGET', key, 'sold', 'old', 'set')
  local sold, old = tonumber(v[1]) or 0, tonumber(v[2])
  local stale, cutoff = stale_buckets(old, now, p)
  if stale then
    for _, f in ipairs(stale) do
      local b = tonumber(redis.call('HGET', key, f))
      if b then
        sold = sold - b
        redis.call('HDEL', key, f)
      end
    end
    old = cutoff
  end
  if sold <= 0 then
    sold = 0
    old = math.floor(now / p.bms)
    redis.call('ZADD', sku_index(key), 0, sku)
  end
  -- integers formatted as such ('%d'): cheaper than the float format Redis and `..` apply
  local fmt = string.format
  redis.call('HINCRBY', key, fmt('b:%d', math.floor(now / p.bms)), fmt('%d', q))
  redis.call('HSET', key, 'sold', fmt('%d', sold + q), 'old', fmt('%d', old))
  if v[3] ~= '1' then redis.call('PEXPIRE', key, fmt('%d', (p.nb + 1) * p.bms)) end
end

-- Payment sync (issue 5, docs/payments.md) ------------------------------------------------------

-- An id percent-encoded as resolver.escape does, for record keys derived inside a script from
-- a partition's record key prefix.
local KEY_ESCAPES = {['%'] = '%25', [':'] = '%3A', ['{'] = '%7B', ['}'] = '%7D'}
local function key_escape(id)
  return (string.gsub(id, '[%%:{}]', KEY_ESCAPES))
end

-- Read-only: an error when the out_trade_no map `mk` already names another order.
local function payment_conflict(mk, oid, otn)
  if not mk then return nil end
  local other = redis.call('GET', mk)
  if other and other ~= oid then
    return {err = 'PAYMENT_CONFLICT', meta = {out_trade_no = otn, order_id = other}}
  end
  return nil
end

-- Write: mark a HELD record payment-pending and schedule its first poll: the schedule's first
-- step, but never later than the final poll at deadline - margin. `ps` is {steps = {ms, ...},
-- margin = ms, ttl = ms (lifetime of the out_trade_no map)}. Returns the first poll's time.
-- `mk` nil: the out_trade_no map is in another slot and was claimed before (claim.lua).
local function start_polling(rk, pk, mk, oid, prov, otn, now, dl, ps)
  local first = math.min(now + ps.steps[1], dl - ps.margin)
  redis.call('HSET', rk, 'pprov', prov, 'potn', otn, 'pst', 'PENDING', 'polls', 0,
    'pnext', first)
  redis.call('HDEL', rk, 'pex')
  if redis.call('HGET', rk, 'pflag') == 'POLLS_EXHAUSTED' then redis.call('HDEL', rk, 'pflag') end
  redis.call('ZADD', pk, first, oid)
  if mk then redis.call('SET', mk, oid, 'PX', ps.ttl) end
  return first
end

-- Redis Cluster: orders whose keys span slots (issue 11, docs/cluster.md) ----------------------

-- The settle index (zset: order id -> when recovery settles its parts) of the partition of a
-- key (same slot).
local function settle_index(key)
  return tag_of(key) .. 'settle'
end
