-- pricehub: KEYS: epoch. ARGV: expected, replacement, channel. Compare-and-set, announced
-- to all.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('PUBLISH', ARGV[3], '!epoch ' .. ARGV[2])
end
return redis.call('GET', KEYS[1])
