-- payment_poll.lua: claim the due payment polls of one partition and reschedule them, in one call.
--
-- KEYS[1] the poll index (zset: order id -> next poll ms, Redis clock) of one partition
-- KEYS[2] the event stream of that partition
-- ARGV[1] N, the most index entries to claim (1..500)
-- ARGV[2] JSON: {"steps": [ms, ...] (the wait before each poll), "margin": ms, "maxlen": int,
--                "prefix": the partition's record key prefix ("<prefix>:{p<N>}:order:"); a
--                record's key is this prefix + the order id percent-encoded (key_escape),
--                "actor": who polls (the PAYMENT_FLAGGED events' actor, "poller")}
-- Returns JSON: {"claims": [[order id, provider, out_trade_no, poll number, final 0|1], ...],
--                "flagged": n, "stale": n, "full": 0|1}
--
-- A claim is the right and the duty to query the provider once for that order: the entry is
-- moved to the next step in the same call, so with every process polling each order is
-- queried once per step. Per order (record fields polls = queries so far, pex = exhausted):
--   polls < #steps          claim poll polls+1; the next one is due a step after this one's
--                           due time (or a step from now, if that is already past)
--   polls = #steps, no pex  the schedule is over, still pending: flag POLLS_EXHAUSTED (one
--                           PAYMENT_FLAGGED event), no query; the next entry is the final poll
--   final poll              every entry is due no later than deadline - margin; one claimed at
--                           or after it is the last query of this hold, and the entry is removed
-- Entries without a HELD, payment-pending record before its deadline are stale: removed.
-- Record keys are derived here, not passed in KEYS (as expire.lua; see docs/architecture.md).

local pk, ek = KEYS[1], KEYS[2]
local n = tonumber(ARGV[1])
if not n or n < 1 or n > 500 or n % 1 ~= 0 then
  return redis.error_reply('payment_poll.lua: N must be an integer within 1..500')
end
local a = cjson.decode(ARGV[2])
local steps = a.steps
local last = #steps
if last < 1 or not a.margin or not a.maxlen or not a.prefix then
  return redis.error_reply('payment_poll.lua: bad steps, margin, maxlen or prefix')
end

local now = now_ms()
local function after(score, step)
  local t = score + step
  if t <= now then t = now + step end
  return t
end

local due = redis.call('ZRANGEBYSCORE', pk, '-inf', now, 'WITHSCORES', 'LIMIT', 0, n)
local claims, flagged, stale = {}, 0, 0
for i = 1, #due, 2 do
  local oid, score = due[i], tonumber(due[i + 1])
  local rk = a.prefix .. key_escape(oid)
  local f = redis.call('HMGET', rk, 'st', 'dl', 'pst', 'pprov', 'potn', 'polls', 'pex')
  local dl = tonumber(f[2])
  if f[1] ~= 'H' or f[3] ~= 'PENDING' or not dl or now >= dl then
    redis.call('ZREM', pk, oid)
    if f[1] then redis.call('HDEL', rk, 'pnext') end
    stale = stale + 1
  else
    local k, ex = tonumber(f[6]) or 0, f[7] == '1'
    local fin = dl - a.margin
    local final = now >= fin
    local query = final
    if k < last then
      query = true
    elseif not ex then
      redis.call('HSET', rk, 'pex', 1, 'pflag', 'POLLS_EXHAUSTED')
      emit(ek, a.maxlen, 'PAYMENT_FLAGGED', 'order_id', oid, now,
        {flag = 'POLLS_EXHAUSTED', reason = 'POLLS_EXHAUSTED', polls = k,
         payment = {provider = f[4], out_trade_no = f[5]}}, a.actor)
      ex = true
      flagged = flagged + 1
    end
    if query then
      k = k + 1
      claims[#claims + 1] = {oid, f[4], f[5], k, final and 1 or 0}
    end
    if query and final then
      redis.call('ZREM', pk, oid)
      redis.call('HSET', rk, 'polls', k)
      redis.call('HDEL', rk, 'pnext')
    else
      local nxt
      if k < last then
        nxt = after(score, steps[k + 1])
      elseif not ex then
        nxt = after(score, steps[last])
      else
        nxt = fin
      end
      if nxt > fin then nxt = fin end
      redis.call('ZADD', pk, nxt, oid)
      redis.call('HSET', rk, 'polls', k, 'pnext', nxt)
    end
  end
end

return cjson.encode({claims = claims, flagged = flagged, stale = stale,
  full = (#due == 2 * n) and 1 or 0})
