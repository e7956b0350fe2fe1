-- pricehub: KEYS: restored. ARGV: mirror id ('' only reads). While the restored set
-- lives: add the mirror (it wrote back what it had) and return the members; else false.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
if ARGV[1] ~= '' then
  redis.call('SADD', KEYS[1], ARGV[1])
end
return redis.call('SMEMBERS', KEYS[1])
