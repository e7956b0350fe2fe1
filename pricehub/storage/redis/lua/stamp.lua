-- pricehub fragment (included by the append scripts, see storage/redis/scripts.py):
-- ``accepted_at`` (PROTOCOL.md), the moment the seq is given, taken inside the script that
-- gives it, from Redis's own clock (TIME), not the instance's: so it is the moment of
-- numbering whichever instance sent the price and however long it queued in a pipeline,
-- and a zone's prices all get their time from one clock (its keys live on one node, on a
-- cluster too) instead of from instances whose clocks may disagree. The value is then
-- stored in the payload (history, latest, the published message): every instance serves
-- it as stored, never recomputes it. TIME may precede writes in a script because Redis
-- replicates a script's effects, not the script (the default since Redis 5, the only mode
-- since 7.0): a replica or an AOF replay gets the payload with the time in it and never
-- runs TIME again. One TIME per script: a batch (append_many.lua) is numbered in one
-- atomic step, and its prices share the value. ``utc_text`` is
-- ``messages.format_accepted_at`` in Lua (days to civil date, H. Hinnant's algorithm:
-- Redis's Lua has no os.date); a test compares the two.
local function utc_text(secs, micros)
  local days = math.floor(secs / 86400)
  local rem = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', year, month, day,
    math.floor(rem / 3600), math.floor(rem % 3600 / 60), rem % 60, micros)
end

local function accepted_now()
  local now = redis.call('TIME')
  return utc_text(tonumber(now[1]), tonumber(now[2]))
end
