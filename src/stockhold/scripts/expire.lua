-- expire.lua: claim up to N due holds of one partition and expire them, in this one call.
--
-- KEYS[1] the expiry index (zset: order id -> deadline ms) of one partition
-- KEYS[2] the event stream of that partition
-- ARGV[1] N, the most index entries to claim (1..500)
-- ARGV[2] retention of a finished record (ms)
-- ARGV[3] approximate maximum length of the event stream
-- ARGV[4] the record key prefix of the partition ("<prefix>:{p<N>}:order:"); a record's key
--         is this prefix + the order id with % : { } percent-encoded (as resolver.escape)
-- ARGV[5] who expires them (the events' actor: "sweeper")
-- Returns JSON: {"expired": n, "stale": n, "repaired": n, "stuck": [order id, ...], "full": 0|1,
--                "settle": [order id, ...]}
--   expired  HELD reservations at or past their deadline, now EXPIRED (one event each)
--   stale    index entries without a HELD record (gone or finished): removed from the index
--   repaired index entries due by their score but not by the record's deadline: re-scored
--   stuck    refused (a reserved counter below the hold): left as they are, for a person
--   full     the claim took N entries: more may be due
--   settle   expired orders whose stock is in parts in other slots (Redis Cluster, a "parts"
--            field, docs/cluster.md): the record is EXPIRED and the order queued in the
--            partition's settle index; the caller settles the parts
--
-- Claim and expiry are one script, so every process may sweep at once: an entry is claimed by
-- exactly one call, and the record's own deadline on Redis's clock is re-checked, so nothing
-- expires before it. The record and stock keys are not in KEYS: they are derived from the
-- claimed ids and read from each record's "keys" field. On Redis Cluster an order's stock is
-- in its home slot (a single-slot order) or in parts (settled afterwards), never elsewhere,
-- so every key this touches is in the partition's slot (docs/cluster.md).

local xk, ek = KEYS[1], KEYS[2]
local n, retention, maxlen = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local record_prefix, actor = ARGV[4], ARGV[5]
if not n or n < 1 or n > 500 or n % 1 ~= 0 then
  return redis.error_reply('expire.lua: N must be an integer within 1..500')
end
if not retention or retention < 1 or not maxlen or maxlen < 1 or not record_prefix then
  return redis.error_reply('expire.lua: bad retention, maxlen or record key prefix')
end

local function record_key(oid)
  return record_prefix .. key_escape(oid)
end

local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', xk, '-inf', now, 'LIMIT', 0, n)
local expired, stale, repaired, stuck, settle = 0, 0, 0, {}, {}

for _, oid in ipairs(due) do
  local rk = record_key(oid)
  local f = redis.call('HMGET', rk, 'st', 'dl', 'keys', 'units', 'alloc', 'parts')
  local rec = {st = f[1], dl = f[2], keys = f[3], units = f[4], alloc = f[5], parts = f[6]}
  if rec.st ~= 'H' then
    -- gone (retention) or already finished: the index entry is stale
    redis.call('ZREM', xk, oid)
    stale = stale + 1
  elseif now < tonumber(rec.dl) then
    -- the record's deadline decides; an index entry that disagrees is repaired, not acted on
    redis.call('ZADD', xk, rec.dl, oid)
    repaired = repaired + 1
  else
    local keys, alloc = cjson.decode(rec.keys), cjson.decode(rec.alloc)
    local ok = true
    if rec.parts then alloc = {} end  -- settled in the parts' slots afterwards
    for _, a in ipairs(alloc) do
      local r = tonumber(redis.call('HGET', keys[a[1]], 'r:' .. a[2])) or 0
      if r < a[3] then ok = false break end
    end
    if not ok then
      stuck[#stuck + 1] = oid
    else
      -- Everything checked for this order: write.
      for _, a in ipairs(alloc) do
        redis.call('HINCRBY', keys[a[1]], 'r:' .. a[2], -a[3])
        redis.call('HINCRBY', keys[a[1]], 'a:' .. a[2], a[3])
      end
      redis.call('HSET', rk, 'st', 'E', 'up', now)
      redis.call('ZREM', xk, oid)
      redis.call('PEXPIRE', rk, retention)
      if rec.parts then
        redis.call('ZADD', settle_index(xk), now + CFG_RECOVER_MS, oid)
        settle[#settle + 1] = oid
      end
      emit(ek, maxlen, 'ORDER_EXPIRED', 'order_id', oid, now, {allocations = alloc_payload(rec)},
        actor)
      expired = expired + 1
    end
  end
end

-- cjson encodes an empty table as {}; the caller reads "stuck" as a list either way.
return cjson.encode({expired = expired, stale = stale, repaired = repaired, stuck = stuck,
  full = (#due == n) and 1 or 0, settle = settle})
