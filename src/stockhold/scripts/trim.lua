-- trim.lua: retention of one partition's event stream (issue 12, stockhold.delivery.trim).
-- The stream keeps every entry some consumer group still needs: it is trimmed (XTRIM MINID ~)
-- below min(the floor of every group, now - retention), where a group's floor is its oldest
-- pending entry, else the id right after its last-delivered id. The scripts' XADD MAXLEN ~
-- (the hard cap) may still drop entries a group never got: on Redis 7 such a group (its
-- last-delivered id before the first entry, and an entry after it deleted) is counted (the
-- exact number where the group's entries-read is known) and moved to right before the first
-- entry, so the loss is counted once.
--
-- KEYS[1] the partition's event stream
-- KEYS[2..] the delivery statistics `<tag>dstat:<name>` of the subscriptions in ARGV[2..]
-- ARGV[1] the retention (ms)
-- ARGV[2..] the group names of the listed subscriptions ("sub:<name>")
-- Returns {length, first entry id or '', entries trimmed, {group, lost, ...}}; each group's
-- lost entries are also added to its statistics' field 'lost'.

local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return {0, '', 0, {}} end

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
local function less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local function text(id) return string.format('%d-%d', id[1], id[2]) end

local info = hash_table(redis.call('XINFO', 'STREAM', stream))
local first = info['first-entry'] and parse(info['first-entry'][1])
local added = info['entries-added']
local length = info['length']
local floor = {now_ms() - tonumber(ARGV[1]), 0}
local stats = {}
for i = 2, #ARGV do stats[ARGV[i]] = KEYS[i] end
local lost = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local gi = hash_table(g)
  local last = parse(gi['last-delivered-id'])
  local f = {last[1], last[2] + 1}
  if gi['pending'] > 0 then
    f = parse(redis.call('XPENDING', stream, gi['name'])[2])
  end
  local dstat = stats[gi['name']]
  local read = gi['entries-read']
  local n = 0
  if dstat and first and added and type(read) == 'number' and less(last, first) then
    n = added - read - length  -- every entry still there is after `last`
  end
  if n > 0 then
    local before = string.format('%d-18446744073709551615', first[1] - 1)
    if first[2] > 0 then before = text({first[1], first[2] - 1}) end
    redis.call('XGROUP', 'SETID', stream, gi['name'], before, 'ENTRIESREAD', added - length)
    redis.call('HINCRBY', dstat, 'lost', n)
    lost[#lost + 1] = gi['name']
    lost[#lost + 1] = n
    f = first
    if gi['pending'] > 0 then
      local p = parse(redis.call('XPENDING', stream, gi['name'])[2])
      if less(p, f) then f = p end
    end
  end
  if less(f, floor) then floor = f end
end
local trimmed = 0
if first and less(first, floor) then
  trimmed = redis.call('XTRIM', stream, 'MINID', '~', text(floor))
end
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
return {redis.call('XLEN', stream), head[1] and head[1][1] or '', trimmed, lost}
