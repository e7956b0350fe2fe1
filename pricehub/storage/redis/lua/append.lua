-- pricehub: one append (storage/redis/storage.py, the writer's lone price).
-- KEYS: seq, history, latest, epoch [, ingest lease, ingest stream]
-- ARGV: body, history_size, channel, zone, epoch [, consumer token, group, entry id]
-- Returns "<accepted_at> <seq>": the caller rebuilds the stored payload from it byte for
-- byte (``with_seq``), so the price it answers with is the one Redis stores.
-- A price its zone's keys refuse is an error reply (PRICEHUB_ZONE); its ingest entry is
-- acknowledged all the same: left pending, it would hold up every later entry (the
-- order check), and it would only be refused again. The consumer logs and counts it.
-- include store.lua
if redis.call('GET', KEYS[4]) ~= ARGV[5] then
  return redis.error_reply('PRICEHUB_EPOCH numbering lineage changed')
end
if #KEYS == 6 then
  if redis.call('GET', KEYS[5]) ~= ARGV[6] then
    return redis.error_reply('PRICEHUB_LEASE ingest lease lost')
  end
  if #redis.call('XPENDING', KEYS[6], ARGV[7], '-', '(' .. ARGV[8], 1) > 0 then
    return redis.error_reply('PRICEHUB_ORDER an older ingest entry is still pending')
  end
end
local accepted = accepted_now()
local seq, payload = store(KEYS[1], KEYS[2], KEYS[3], ARGV[1], -(tonumber(ARGV[2]) + 1),
  accepted)
if seq then
  redis.call('PUBLISH', ARGV[3], ARGV[5] .. ' ' .. ARGV[4] .. ' ' .. payload)
end
if #KEYS == 6 then
  redis.call('XACK', KEYS[6], ARGV[7], ARGV[8])
  -- The stream is a queue, not an archive: a consumed entry is deleted so it stays
  -- bounded by the backlog (history lives in the per-zone ZSETs).
  redis.call('XDEL', KEYS[6], ARGV[8])
end
if not seq then return redis.error_reply('PRICEHUB_ZONE ' .. payload) end
return string.format('%s %d', accepted, seq)
