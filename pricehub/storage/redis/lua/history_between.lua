-- pricehub: a history by market time, filtered on the Redis side (storage/redis/reads.py).
--
-- KEYS: the zones' history sorted sets (score = seq, member = the stored price object).
-- ARGV: from, to (the stored timestamp form, YYYY-MM-DDTHH:MM:SS.mmmZ, so string
--       comparison orders them), the most prices to return (the caller's limit + 1,
--       which tells it whether the answer was cut), then each key's zone name.
-- Returns zone index (1-based, into KEYS) and payload pairs, flat, ordered by
-- (timestamp, zone, seq), only for prices with from <= timestamp < to.
--
-- Cost: one pass over each queried zone's retained history (at most --history-size
-- members each), nothing over other zones, nothing on the write path. A zone's history
-- is in seq order, not market time order (a publisher may send an older time), so no
-- range of ranks can be skipped. A history that is no sorted set (damaged by hand) is
-- left out, as the load scripts do, instead of failing the query for every zone.
local from, to, most = ARGV[1], ARGV[2], tonumber(ARGV[3])
local found = {}
for index, key in ipairs(KEYS) do
  local zone = ARGV[3 + index]
  local payloads = redis.pcall('ZRANGE', key, 0, -1)
  if type(payloads) == 'table' and payloads.err == nil then
    for rank = 1, #payloads do
      local payload = payloads[rank]
      -- The timestamp is the object's last field (wire.messages.timestamp_of): read at
      -- its fixed place, behind ':"' (looked at as bytes: no string is made for a check
      -- that runs for every retained price); anything else (never written by pricehub)
      -- is searched for.
      local stamp
      if string.byte(payload, -28) == 58 and string.byte(payload, -27) == 34 then
        stamp = string.sub(payload, -26, -3)
      else
        stamp = string.match(payload, '"timestamp":"([^"]*)"')
      end
      if stamp and stamp >= from and stamp < to then
        found[#found + 1] = {stamp, zone, rank, index, payload}
      end
    end
  end
end
-- Within a zone, rank order is seq order (score = seq).
table.sort(found, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end)
local reply = {}
for position = 1, math.min(#found, most) do
  reply[2 * position - 1] = found[position][4]
  reply[2 * position] = found[position][5]
end
return reply
