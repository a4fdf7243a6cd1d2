-- policy_set.lua: store (or reset) one SKU's policy; one SKU_POLICY_CHANGED event.
--
-- KEYS[1] the SKU's policy hash   KEYS[2] the SKU index (zset) of its partition
-- KEYS[3] the event stream of the SKU's partition
-- ARGV[1] JSON: {"sku": str, "reset": bool, "set": {field: value, ...} (only fields given:
--          to, hold, maxq as integers, hot, pin as 0|1), "maxlen": int,
--          "pol": {"thr": units, "bms": bucket ms, "nb": buckets},
--          "actor": who sets it (the event's actor)}
-- Returns JSON {"state": sku_state, "now": ms}. Validation happens before the call (servicer);
-- the script only writes. Sales buckets are kept across a reset: they are facts, not policy.

local a = cjson.decode(ARGV[1])
local key, index, events = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms()
local fields = {'to', 'hold', 'maxq', 'hot', 'pin'}
if a.reset then
  redis.call('HDEL', key, 'to', 'hold', 'maxq', 'hot', 'pin', 'set', 'up')
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', index, a.sku)
  else
    redis.call('PEXPIRE', key, (a.pol.nb + 1) * a.pol.bms)
  end
else
  local flat = {}
  for _, f in ipairs(fields) do
    local v = a.set[f]
    if v ~= nil then
      flat[#flat + 1] = f
      flat[#flat + 1] = v
    end
  end
  redis.call('HSET', key, 'set', 1, 'up', now, unpack(flat))
  redis.call('PERSIST', key)
  redis.call('ZADD', index, 0, a.sku)
end
local st = sku_state(key, now, a.pol)
emit(events, a.maxlen, 'SKU_POLICY_CHANGED', 'sku', a.sku, now,
  {reset = a.reset and true or false, reserve_timeout_ms = st.to, hold_seconds = st.hold,
   max_line_quantity = st.maxq, hot = st.hot_flag, pinned = st.pin}, a.actor)
return cjson.encode({state = st, now = now})
