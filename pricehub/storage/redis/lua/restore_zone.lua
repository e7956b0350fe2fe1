-- pricehub fragment: the body of restore.lua and cluster_restore.lua, which differ only
-- in the ``publish(channel, message)`` they define before including it (PUBLISH on one
-- node, SPUBLISH to the zone's sharded channel on a cluster). See restore.lua.
local function after(a, b)
  local ams, asq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bsq = string.match(b, '^(%d+)-(%d+)$')
  ams, asq, bms, bsq = tonumber(ams), tonumber(asq), tonumber(bms), tonumber(bsq)
  return ams > bms or (ams == bms and asq > bsq)
end
local current = stored(KEYS[1], KEYS[2]) or 0
if current < 0 then return 2 end
local entries = {}
for seq, entry in string.gmatch(ARGV[6], '(%d+) ([^,]+)') do entries[tonumber(seq)] = entry end
local newest = nil
local diverged = 0
for i = 7, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  local payload = ARGV[i + 1]
  local ours = true
  if seq <= current then
    local held = redis.call('ZRANGE', KEYS[2], seq, seq, 'BYSCORE')
    if held[1] and held[1] ~= payload then diverged = 1 end
    ours = held[1] == payload
  else
    redis.call('ZADD', KEYS[2], seq, payload)
    redis.call('SET', KEYS[3], payload)
    publish(ARGV[2], ARGV[5] .. ' ' .. ARGV[3] .. ' ' .. payload)
  end
  if ours and entries[seq] then newest = entries[seq] end
end
if newest and #KEYS == 4 then
  local last = redis.call('GET', KEYS[4])
  if not last or after(newest, last) then redis.call('SET', KEYS[4], newest) end
end
if tonumber(ARGV[4]) > current then
  redis.call('SET', KEYS[1], ARGV[4])
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[1]) + 1))
return diverged
