-- pricehub: recovery of one zone (RedisStorage.restore).
-- KEYS: seq, history, latest [, zone ingested (a cluster's)].
-- ARGV: history_size, channel, zone, our last seq, epoch, the ingest entries of our
-- prices ("seq entry_id" items joined by ",", or ""), then (seq, payload) pairs oldest
-- first.
-- Writes back (and publishes) the prices Redis lacks, raises the seq to ours so no
-- instance's numbering goes backwards, and reports whether a seq both sides hold
-- carries different prices (numbering diverged during the outage): 1, else 0; 2 when
-- the zone's keys are damaged (nothing written: its prices stay this instance's).
-- On a cluster the zone's last applied entry id (which its append script skips up to)
-- is raised to the entry of the newest of our prices Redis now holds (written back, or
-- already there: another instance's copy may have written it back first): a promotion
-- that lost such a price lost the id with it (same slot), and the entry would be
-- applied again. Raised only, never lowered (stream ids compared as numbers).
-- include stored.lua
local function publish(channel, message)
  redis.call('PUBLISH', channel, message)
end
-- include restore_zone.lua
