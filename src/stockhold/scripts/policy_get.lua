-- policy_get.lua: SKU policies with their live state (hot now, units sold in the window).
--
-- KEYS[1..n] the policy hashes of n SKUs (each beside its partition's SKU index, sku_index)
-- ARGV[1] JSON: {"skus": [sku, ...] (parallel to KEYS), "prune": bool,
--          "pol": {"thr": units, "bms": bucket ms, "nb": buckets}}
-- Returns JSON {"states": [sku_state or false, ...], "now": ms}: false where no hash exists
-- (no stored policy and no sale in the window). With "prune", such SKUs leave the index.

local a = cjson.decode(ARGV[1])
local now = now_ms()
local states = {}
for i, sku in ipairs(a.skus) do
  local key = KEYS[i]
  if redis.call('EXISTS', key) == 1 then
    states[i] = sku_state(key, now, a.pol)
  else
    states[i] = false
    if a.prune then redis.call('ZREM', sku_index(key), sku) end
  end
end
return cjson.encode({states = states, now = now})
