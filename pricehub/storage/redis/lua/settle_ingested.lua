-- pricehub: after restore.lua, in the same MULTI (RedisStorage.restore's ``entries``):
-- the stream entries that ingest turned into prices Redis now holds are acknowledged and
-- deleted, so that none is applied again. A promotion that lost replication loses an
-- entry's XACK (and XDEL) with its price; written back from an instance's mirror, the
-- price is there again, and the entry, still pending or not even delivered on the new
-- master, would be read and appended a second time, under a new seq. Only where Redis
-- holds exactly our payload at that seq: a diverged seq's price is declared lost (the
-- epoch changes), and its entry is then rightly applied again in the new epoch.
-- KEYS: history, stream. ARGV: group, then (seq, entry id, payload) triples.
local settled = 0
for i = 2, #ARGV, 3 do
  local held = redis.call('ZRANGE', KEYS[1], ARGV[i], ARGV[i], 'BYSCORE')
  if held[1] == ARGV[i + 2] then
    redis.pcall('XACK', KEYS[2], ARGV[1], ARGV[i + 1])
    settled = settled + redis.call('XDEL', KEYS[2], ARGV[i + 1])
  end
end
return settled
