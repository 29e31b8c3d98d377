-- recover: treat expired leases as failed attempts (reason worker_lost) and promote due
-- delayed jobs, so a class with no live worker still has its due work made ready; also purge
-- dead letters past their retention, which otherwise happens only when another job dies. Safe
-- to run from any number of processes at once: each expired lease is handled by exactly one call.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: limit per class, then the classes
-- Returns: {recovered_count, promoted_count}
local limit = tonumber(ARGV[1])
local recovered, promoted = 0, 0
for c = 2, #ARGV do
  local class = ARGV[c]
  local expired = redis.call('ZRANGEBYSCORE', K_LEASE .. class, '-inf', fmt(NOW_MS),
    'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    local job = read_job(id, 's')
    if job and job[1] == 'active' then
      fail_attempt(id, class, 'worker_lost', 'lease expired without ack or heartbeat', false,
        -1, -1)
      recovered = recovered + 1
    else
      redis.call('ZREM', K_LEASE .. class, id)
    end
  end
  promoted = promoted + promote(class, limit)
end
dead_letter_trim()
finish()
return {recovered, promoted}
