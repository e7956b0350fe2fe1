-- pricehub fragment (included by every append script, the cluster's too): one price into
-- its zone's keys. Returns its seq and payload, or nil and why the zone's keys refuse it,
-- with nothing written: a seq that is no integer, or out of 1 .. 2^53 - 1 (what Lua's
-- numbers hold exactly), or a history that is no sorted set. Such damage (a key set by
-- hand or by another program) is that zone's, not the feed's: its prices fail, the others
-- go on (``redis.pcall``; ``redis.call`` would abort the script, and with it a whole batch
-- half written, as an error the caller could not tell from a broken Redis). A price costs
-- the steps of before (INCR, ZADD, ZREMRANGEBYRANK, SET): the checks ride in their
-- replies, and a refused price's INCR is taken back (``undo``: a seq key it created is
-- deleted again). ``accepted``: the script's ``accepted_now()``.
-- include stamp.lua
local function undo(seq_key)
  if redis.call('DECR', seq_key) == 0 then redis.call('DEL', seq_key) end
end

local function store(seq_key, history_key, latest_key, body, keep, accepted)
  local seq = redis.pcall('INCR', seq_key)
  if type(seq) == 'table' then return nil, seq_key .. ': ' .. seq.err end
  if seq < 1 or seq > 9007199254740991 then
    undo(seq_key)
    return nil, seq_key .. ': not a seq from 1 to 2^53 - 1'
  end
  local payload = string.format('{"seq":%d,"accepted_at":"%s",', seq, accepted)
    .. string.sub(body, 2)
  local added = redis.pcall('ZADD', history_key, seq, payload)
  if type(added) == 'table' then
    undo(seq_key)
    return nil, history_key .. ': ' .. added.err
  end
  redis.call('ZREMRANGEBYRANK', history_key, 0, keep)
  redis.call('SET', latest_key, payload)
  return seq, payload
end
