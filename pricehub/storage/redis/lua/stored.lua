-- pricehub fragment (included by the scripts that read a zone's state: load, restore; the
-- cluster's too): the seq its key holds, nil without one, or -1 when its keys are damaged
-- (a seq that is no integer from 0 to 2^53 - 1, as store.lua's ``store`` takes them, or a
-- history that is no sorted set). A damaged zone is left out (logged) instead of failing
-- the script, and with it a start or a recovery for every zone.
local function stored(seq_key, history_key)
  local raw = redis.pcall('GET', seq_key)
  if not raw then return nil end
  local kind = redis.call('TYPE', history_key)['ok']
  if type(raw) ~= 'string' or (kind ~= 'zset' and kind ~= 'none') then return -1 end
  if raw ~= '0' and not string.match(raw, '^[1-9]%d*$') then return -1 end
  local seq = tonumber(raw)
  if seq > 9007199254740991 then return -1 end
  return seq
end
