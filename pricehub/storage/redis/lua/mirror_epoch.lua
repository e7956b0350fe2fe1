-- pricehub (cluster): KEYS: zone epoch. ARGV: epoch, channel. Copy the global epoch into
-- the zone's slot; a change is announced on the zone's channel (ordered before the zone's
-- next price).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SPUBLISH', ARGV[2], '!epoch ' .. ARGV[1])
end
return 1
