-- _prelude.lua: helpers prepended to every operation script by stockhold.scripts (not a script
-- of its own). Everything here is local to the script that includes it.

-- Milliseconds on Redis's own clock: the only clock stockhold trusts.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- HGETALL reply -> table.
local function hash_table(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

-- Append one event to a partition stream, trimmed to about maxlen entries.
local function emit(stream, maxlen, etype, id_field, id, now, data)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
    'type', etype, id_field, id, 'ts', now, 'data', cjson.encode(data))
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

