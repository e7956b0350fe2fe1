-- pricehub: one append on a Redis Cluster (storage/cluster.py).
-- KEYS: seq, history, latest, zone epoch [, zone ingested]
-- ARGV: body, history_size, channel, message prefix, epoch [, ingest entry id]
-- As append.lua (accepted_at from the TIME of the zone's master, reply "<accepted_at>
-- <seq>"), with the zone's epoch mirror and SPUBLISH; an ingest entry whose id is not
-- above the zone's last applied one was applied before: skipped, seq 0. A price its
-- zone's keys refuse (damaged, see store.lua) is an error reply (PRICEHUB_ZONE); its
-- entry is acknowledged after it like an applied one (``_ack_ingested``).
-- include store.lua
if redis.call('GET', KEYS[4]) ~= ARGV[5] then
  return redis.error_reply('PRICEHUB_EPOCH numbering lineage changed')
end
local accepted = accepted_now()
if #KEYS == 5 then
  local last = redis.call('GET', KEYS[5])
  if last then
    local lms, lsq = string.match(last, '^(%d+)-(%d+)$')
    local ms, sq = string.match(ARGV[6], '^(%d+)-(%d+)$')
    lms, lsq, ms, sq = tonumber(lms), tonumber(lsq), tonumber(ms), tonumber(sq)
    if ms < lms or (ms == lms and sq <= lsq) then return accepted .. ' 0' end
  end
end
local seq, payload = store(KEYS[1], KEYS[2], KEYS[3], ARGV[1], -(tonumber(ARGV[2]) + 1),
  accepted)
if not seq then return redis.error_reply('PRICEHUB_ZONE ' .. payload) end
redis.call('SPUBLISH', ARGV[3], ARGV[4] .. payload)
if #KEYS == 5 then redis.call('SET', KEYS[5], ARGV[6]) end
return string.format('%s %d', accepted, seq)
