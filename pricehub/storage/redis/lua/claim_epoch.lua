-- pricehub: KEYS: epoch, restored. ARGV: candidate, channel, restored TTL (ms). Claim the
-- epoch unless Redis has one; a new lineage (Redis lost its data) is announced so that
-- subscribers learn it, and the restored set is started (empty but for a placeholder, so
-- that it exists): every instance reconciling while it lives learns, atomically with the
-- claim, that Redis was found empty and is being restored (``written_back``).
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('PUBLISH', ARGV[2], '!epoch ' .. ARGV[1])
  redis.call('DEL', KEYS[2])
  redis.call('SADD', KEYS[2], '')
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return redis.call('GET', KEYS[1])
