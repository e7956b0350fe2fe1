-- pricehub (cluster): KEYS: epoch. ARGV: expected, replacement. Compare-and-set
-- (announced per zone after, mirror_epoch.lua).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
end
return redis.call('GET', KEYS[1])
