-- lease.lua: who delivers a subscription's partition (issue 12, stockhold.delivery.deliverer),
-- and the registry of live deliverers that the fair share is computed from.
--
-- KEYS[1] the lease `<tag>lease:<name>` (acquire, renew, release) or the registry
--         `<prefix>:{meta}:deliverers` (register, unregister)
-- ARGV[1] 'acquire' | 'renew' | 'release' | 'register' | 'unregister'
-- ARGV[2] the deliverer's owner id "<host>:<pid>:<random>"
-- ARGV[3] (acquire, renew) the lease length (ms); (register) how long the entry lives (ms)
-- Returns: acquire 1 when the lease is (now) the owner's, 0 when another holds it;
--   renew 1 when it is the owner's (renewed; or taken again when it had expired and nobody
--   took it meanwhile: the owner's pending entries and order are intact), 0 when another
--   holds it (nothing changed); release 1 when it was the owner's (deleted), else 0;
--   register: the number of live deliverers, this one included; unregister: 1|0.

local op, key, owner = ARGV[1], KEYS[1], ARGV[2]
if op == 'acquire' then
  local holder = redis.call('GET', key)
  if not holder then
    redis.call('SET', key, owner, 'PX', ARGV[3])
    return 1
  end
  if holder == owner then
    redis.call('PEXPIRE', key, ARGV[3])
    return 1
  end
  return 0
elseif op == 'renew' then
  local holder = redis.call('GET', key)
  if holder == owner then
    redis.call('PEXPIRE', key, ARGV[3])
    return 1
  end
  if not holder then
    redis.call('SET', key, owner, 'PX', ARGV[3])
    return 1
  end
  return 0
elseif op == 'release' then
  if redis.call('GET', key) == owner then
    redis.call('DEL', key)
    return 1
  end
  return 0
elseif op == 'register' then
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, now + tonumber(ARGV[3]), owner)
  return redis.call('ZCARD', key)
elseif op == 'unregister' then
  return redis.call('ZREM', key, owner)
end
return redis.error_reply('lease.lua: unknown op ' .. tostring(op))
