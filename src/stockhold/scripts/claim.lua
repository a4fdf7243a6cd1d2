-- claim.lua: claim a name for a value in the name's own slot (Redis Cluster, a key that
-- another step's slot cannot hold: the out_trade_no of a payment, an adjustment id;
-- docs/cluster.md).
--
-- KEYS[1] the name's key   ARGV[1] the value (an order id, a fingerprint)
-- ARGV[2] lifetime (ms), or "release": give the name back if this value holds it
-- Returns 1 when claimed now, false when claimed before by the same value (idempotent), else
-- the value that holds it (nothing written). "release" returns false.

local other = redis.call('GET', KEYS[1])
if ARGV[2] == 'release' then
  if other == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return false
end
if other and other ~= ARGV[1] then return other end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if other then return false end
return 1
