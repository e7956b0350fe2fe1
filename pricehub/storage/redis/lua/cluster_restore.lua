-- pricehub: restore.lua on a Redis Cluster: the same body, publishing on the zone's
-- sharded channel (SPUBLISH).
-- include stored.lua
local function publish(channel, message)
  redis.call('SPUBLISH', channel, message)
end
-- include restore_zone.lua
