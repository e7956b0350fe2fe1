-- pricehub: a batch of appends in one script: one round trip, one reply and one PUBLISH
-- (so one subscriber message on every instance) for the lot, instead of one of each per
-- price. Same steps per price as append.lua, in order; the epoch (and, for ingest, the
-- lease) is checked once, and the batch's stream entries are acknowledged and deleted in
-- the same script as their appends (exactly once).
-- Single Redis only: a zone's keys are built inside the script (prefix .. zone) instead
-- of being declared, because packing three key arguments per price was the largest share
-- of redis-py's cost for a batch. That is fine on one node and wrong on a cluster, where a
-- batch spans slots: RedisClusterStorage sends cluster_append.lua per price instead.
-- KEYS: epoch, ingest lease, ingest stream.
-- ARGV: history_size, channel, epoch, consumer token ('' = no ingest acks), group, the
--       seq, history and latest key prefixes (KeyLayout's, zone appended), and the
--       prices as one string of lines "zone entry_id body" (entry_id '' without acks),
--       then (with acks) the stream id just after the batch's last entry.
--       Zones and ids hold no space, a compact JSON body no newline.
-- Returns "<accepted_at> " and the seqs as one "s1,s2,..." string (cheaper to parse than
-- an array reply); a price its zone's keys refuse has "!<why>" in its place (no comma in
-- it) and is left out of the message, its ingest entry acknowledged with the others (see
-- append.lua). Every price of the batch has that one accepted_at (stamp.lua).
-- include store.lua
if redis.call('GET', KEYS[1]) ~= ARGV[3] then
  return redis.error_reply('PRICEHUB_EPOCH numbering lineage changed')
end
local acking = ARGV[4] ~= ''
if acking then
  if redis.call('GET', KEYS[2]) ~= ARGV[4] then
    return redis.error_reply('PRICEHUB_LEASE ingest lease lost')
  end
  -- Stream order, enforced here: the batch's first entry (its ids are in stream order)
  -- may only be appended once no older entry is pending. The consumer keeps more than
  -- one batch in flight; if a failure ever let a later batch overtake an earlier one,
  -- it is refused and the consumer starts over from the pending entries, oldest first.
  local first = string.match(ARGV[9], '^[^ ]* ([^ ]*) ')
  if #redis.call('XPENDING', KEYS[3], ARGV[5], '-', '(' .. first, 1) > 0 then
    return redis.error_reply('PRICEHUB_ORDER an older ingest entry is still pending')
  end
end
local keep = -(tonumber(ARGV[1]) + 1)
local accepted = accepted_now()
local seq_key, history_key, latest_key = ARGV[6], ARGV[7], ARGV[8]
local blob = ARGV[9]
local pos, i, n = 1, 0, 0
local seqs, lines, ids = {}, {}, {}
while pos <= #blob do
  i = i + 1
  local stop = string.find(blob, '\n', pos, true) or (#blob + 1)
  local first = string.find(blob, ' ', pos, true)
  local second = string.find(blob, ' ', first + 1, true)
  local zone = string.sub(blob, pos, first - 1)
  ids[i] = string.sub(blob, first + 1, second - 1)
  local body = string.sub(blob, second + 1, stop - 1)
  pos = stop + 1
  local seq, payload = store(seq_key .. zone, history_key .. zone, latest_key .. zone, body, keep,
    accepted)
  if seq then
    seqs[i] = seq
    n = n + 1
    lines[n] = zone .. ' ' .. payload
  else
    seqs[i] = '!' .. string.gsub(payload, ',', ';')
  end
end
if acking then
  redis.call('XACK', KEYS[3], ARGV[5], unpack(ids))
  -- As in APPEND_LUA, a consumed entry is deleted (the stream stays a bounded queue),
  -- but by trimming below the batch's last entry (ARGV[10]: the id just after it):
  -- XTRIM frees whole stream nodes; XDEL looked every id up, which cost Redis more than
  -- any other step of an entry (~3 of ~10 us). Nothing older is pending (checked above)
  -- and the batch's own entries are acknowledged by now, but the trim stops at the
  -- oldest entry still pending all the same: an entry never appended is never deleted,
  -- whatever a caller got wrong about the batch being one run of the stream.
  local minid = ARGV[10]
  local pending = redis.call('XPENDING', KEYS[3], ARGV[5], '-', '(' .. minid, 1)
  if #pending > 0 then minid = pending[1][1] end
  redis.call('XTRIM', KEYS[3], 'MINID', minid)
end
if n > 0 then
  redis.call('PUBLISH', ARGV[2], '!many ' .. ARGV[3] .. '\n' .. table.concat(lines, '\n'))
end
return accepted .. ' ' .. table.concat(seqs, ',')
