-- purge: delete dead letters for good.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: job ids
-- Returns: the number of dead letters deleted.
local purged = 0
for _, id in ipairs(ARGV) do
  if redis.call('ZREM', K_DEAD, id) == 1 then
    local job = read_job(id, 't', 'c', 'a') or {}
    redis.call('DEL', K_JOB .. id, K_ERR .. id)
    emit('purged', id, job[1], undead(id, job[2]), job[3], 'manual')
    purged = purged + 1
  end
end
finish()
return purged
