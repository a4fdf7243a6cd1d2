-- abort.lua: Redis Cluster (docs/cluster.md): decide, in an order's home slot, that parts of
-- an attempt will not be finished, unless the order's record already exists.
--
-- KEYS[1] the reservation record   KEYS[2] the order's abort set (nonces, with a lifetime)
-- ARGV[1] the abort set's lifetime (ms)   ARGV[2..] the nonces of the parts to give back
-- Returns JSON: [0]  aborted: finish.lua now refuses these nonces; give their parts back
--               [1, state, parts]  the record exists (its "st" and "parts" fields): give back
--                                  only the parts it does not list
-- finish.lua and this run in the same slot, one at a time: whichever comes first decides.

local rec = redis.call('HMGET', KEYS[1], 'st', 'parts')
if rec[1] then return cjson.encode({1, rec[1], rec[2] or '[]'}) end
for i = 2, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return '[0]'
