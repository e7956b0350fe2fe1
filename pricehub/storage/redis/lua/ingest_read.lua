-- KEYS: stream. ARGV: group, consumer, 'new' or 'claim', count, max entry bytes, max
-- entry items (names and values), budget. Up to ``count`` new entries (XREADGROUP >) or
-- pending ones (XAUTOCLAIM from 0-0, any idle time), each sized inside Redis before
-- anything is sent: an entry over a cap is sent as {id, false, bytes, items} (its fields
-- stay in Redis), one deleted while pending (Redis 6.2) as {id, false}. When the whole
-- stream holds no more than ``budget`` bytes (MEMORY USAGE: the usual case, a burst's
-- backlog) one command takes the batch; otherwise one entry at a time, stopping once the
-- entries taken hold more than ``budget``: no call copies more than one entry beyond it
-- (inside Redis) nor runs longer than that takes. In one script, so nothing lands
-- between the measure and the read. Returns {entries, ids found deleted while pending
-- (Redis 7)}.
local group, consumer, claiming = ARGV[1], ARGV[2], ARGV[3] == 'claim'
local count, max_bytes, max_items = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local budget = tonumber(ARGV[7])

local function take(n, cursor)
  if claiming then
    local reply = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, 0, cursor, 'COUNT', n)
    return reply[2], reply[1], reply[3] or {}
  end
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n,
                           'STREAMS', KEYS[1], '>')
  return reply and reply[1][2] or {}, cursor, {}
end

local function sized(entry)
  local fields = entry[2]
  if not fields then return entry, 0 end
  local size = 0
  for _, part in ipairs(fields) do size = size + #part end
  if #fields > max_items or size > max_bytes then
    return {entry[1], false, size, #fields}, size + #fields
  end
  return entry, size + #fields
end

-- MEMORY refused (an ACL, a proxy): as for a large stream, one entry at a time.
local usage = redis.pcall('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0')
local step = 1
if type(usage) ~= 'table' and (usage or 0) <= budget then step = count end
local out, gone, used, cursor = {}, {}, 0, '0-0'
repeat
  local want = math.min(step, count - #out)
  local entries, deleted
  entries, cursor, deleted = take(want, cursor)
  for _, id in ipairs(deleted) do gone[#gone + 1] = id end
  for _, entry in ipairs(entries) do
    local sent, bytes = sized(entry)
    out[#out + 1] = sent
    used = used + bytes
  end
until #out >= count or used > budget or (claiming and cursor == '0-0')
  or (not claiming and #entries < want)
return {out, gone}
