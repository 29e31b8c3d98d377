-- handback: return leased jobs unrun (graceful drain); the attempt is refunded.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: pairs id, lease_token
-- Returns: the ids whose token was stale.
local stale = {}
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  local class = check_lease(id, ARGV[i + 1])
  if not class then
    stale[#stale + 1] = id
  else
    local key = K_JOB .. id
    local job = redis.call('HMGET', key, 't', 'a', 'g')
    local attempt = math.max(attempts_of(job[2]) - 1, 0)
    redis.call('ZREM', K_LEASE .. class, id)
    redis.call('HSET', key, 's', 'queued', 'a', fmt(attempt), 'qt', fmt(NOW_MS))
    redis.call('HDEL', key, 'lt', 'ld')
    -- Front of its group: it was next in line before the drain interrupted it.
    make_ready(class, job[3] or '', id, true)
    emit('handed_back', id, job[1], class, attempt + 1, 'drain')
  end
end
finish()
return stale
