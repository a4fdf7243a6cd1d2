-- transition.lua: move a batch of HELD reservations forward: commit, release or expire.
--
-- KEYS, one group per order, groups back to back:
--   [g+1] the reservation record   [g+2] the expiry index of its partition
--   [g+3] the event stream of its partition
--   [g+4 .. g+3+n] the stock hashes named in the record's "keys" field, in that order
-- ARGV[1]   JSON header: {"maxlen": int, "retention": ms}
-- ARGV[1+i] JSON of order i: {"op": "commit"|"release"|"expire", "oid": str, "n": int,
--                             "arg": payment_ref (commit) | reason (release)}
-- Returns a JSON array, one entry per order:
--   {"ok": 1, "changed": 0|1, "rec": record}   the reservation after the call
--   {"err": REASON}                             refused, nothing written
--   {"skip": 1}                                 expire only: not HELD or not yet due
-- States only move forward: H -> C | R | E. The deadline decides, not the sweeper: a commit at
-- or after the deadline is refused, a release at or after it becomes the expiry.

local header = cjson.decode(ARGV[1])
local now = now_ms()
local results = {}
local base = 0

local function apply(rec, rk, xk, ek, keys, to, extra_field, extra)
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
  emit(ek, header.maxlen, etype, 'order_id', rec.oid, now, data)
  return {ok = 1, changed = 1, rec = rec}
end

local function transition_one(o, rk, xk, ek, first_stock)
  local op = o.op
  local rec = hash_table(redis.call('HGETALL', rk))
  if rec.st == nil then
    if op == 'expire' then return {skip = 1} end
    return {err = 'RESERVATION_NOT_FOUND'}
  end
  local keys = cjson.decode(rec.keys)
  if #keys ~= o.n then return {err = 'KEYS_CHANGED'} end
  for u = 1, o.n do
    if keys[u] ~= KEYS[first_stock + u - 1] then return {err = 'KEYS_CHANGED'} end
  end
  local st, due = rec.st, now >= tonumber(rec.dl)
  if op == 'commit' then
    if st == 'C' then return {ok = 1, changed = 0, rec = rec} end
    if st == 'R' then return {err = 'RESERVATION_RELEASED'} end
    if st == 'E' or due then return {err = 'RESERVATION_EXPIRED'} end
    return apply(rec, rk, xk, ek, keys, 'C', 'pref', o.arg)
  elseif op == 'release' then
    if st == 'R' or st == 'E' then return {ok = 1, changed = 0, rec = rec} end
    if st == 'C' then return {err = 'RESERVATION_COMMITTED'} end
    if due then return apply(rec, rk, xk, ek, keys, 'E') end
    return apply(rec, rk, xk, ek, keys, 'R', 'why', o.arg)
  else
    if st ~= 'H' or not due then return {skip = 1} end
    return apply(rec, rk, xk, ek, keys, 'E')
  end
end

for i = 2, #ARGV do
  local o = cjson.decode(ARGV[i])
  results[i - 1] = transition_one(o, KEYS[base + 1], KEYS[base + 2], KEYS[base + 3], base + 4)
  base = base + 3 + o.n
end
return cjson.encode(results)
