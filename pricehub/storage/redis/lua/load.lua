-- pricehub: KEYS: per zone its seq and history key. Per zone that has a seq: its
-- (1-based) index in the chunk, the seq and the whole retained history; zones without one
-- are skipped; a zone whose keys are damaged has seq -1 and no history.
-- include stored.lua
local out = {}
for i = 1, #KEYS, 2 do
  local seq = stored(KEYS[i], KEYS[i + 1])
  if seq then
    out[#out + 1] = (i + 1) / 2
    out[#out + 1] = seq
    out[#out + 1] = seq < 0 and {} or redis.call('ZRANGE', KEYS[i + 1], 0, -1)
  end
end
return out
