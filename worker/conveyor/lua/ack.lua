-- ack: record successful attempts.
-- KEYS: the queue keyspace (see _prelude.lua)
-- ARGV: triples id, lease_token, runtime_ms
-- Returns: the ids whose token was stale (lease lost); those jobs are left untouched.
local stale = {}
local leases = {}
local gone = {}
for i = 1, #ARGV, 3 do
  local id, token = ARGV[i], ARGV[i + 1]
  local key = K_JOB .. id
  local job = redis.call('HMGET', key, 's', 'lt', 'c', 't', 'a')
  -- A stale token (lease expired and recovered, or job already finished) changes nothing.
  if job[1] ~= 'active' or job[2] ~= token then
    stale[#stale + 1] = id
  else
    local class = job[3]
    leases[class] = leases[class] or {}
    table.insert(leases[class], id)
    emit('completed', id, job[4], class, job[5], ARGV[i + 2])
    -- History lives in PostgreSQL; Redis keeps a finished job only if retention asks for it.
    if CONFIG.done_ttl_ms > 0 then
      redis.call('HSET', key, 's', 'done', 'ft', fmt(NOW_MS))
      redis.call('HDEL', key, 'lt', 'ld')
      redis.call('PEXPIRE', key, CONFIG.done_ttl_ms)
      redis.call('PEXPIRE', K_ERR .. id, CONFIG.done_ttl_ms)
    else
      gone[#gone + 1] = key
      gone[#gone + 1] = K_ERR .. id
    end
  end
end
for class, ids in pairs(leases) do
  redis.call('ZREM', K_LEASE .. class, unpack(ids))
end
if #gone > 0 then
  redis.call('UNLINK', unpack(gone))
end
finish()
return stale
