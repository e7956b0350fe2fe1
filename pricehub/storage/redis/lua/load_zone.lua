-- pricehub (cluster): KEYS: seq, history. A zone's seq and retained history, read
-- atomically; seq 0 without a price, -1 (no history) when the zone's keys are damaged
-- (see stored.lua).
-- include stored.lua
local seq = stored(KEYS[1], KEYS[2]) or 0
if seq <= 0 then return {seq, {}} end
return {seq, redis.call('ZRANGE', KEYS[2], 0, -1)}
