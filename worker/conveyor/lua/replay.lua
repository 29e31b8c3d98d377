-- replay: move dead letters back to ready with a fresh attempt budget. Payload, class, group
-- and dedup key are untouched; the error history is kept. Idempotent: an id that is no longer
-- dead is skipped.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: job ids
-- Returns: {replayed ids, missing ids (record gone), skipped ids (not dead, or a record of
--          another type that cannot be replayed)}
local replayed, missing, skipped = {}, {}, {}
for _, id in ipairs(ARGV) do
  local key = K_JOB .. id
  local job = read_job(id, 's', 't', 'c', 'g', 'rc')
  if redis.call('ZSCORE', K_DEAD, id) == false or not job then
    skipped[#skipped + 1] = id
  elseif not job[1] then
    redis.call('ZREM', K_DEAD, id)
    undead(id, false)
    missing[#missing + 1] = id
  else
    redis.call('ZREM', K_DEAD, id)
    local class = job[3]
    local replays = attempts_of(job[5]) + 1
    redis.call('HSET', key, 's', 'queued', 'a', '0', 'rc', fmt(replays), 'qt', fmt(NOW_MS))
    redis.call('HDEL', key, 'dr', 'dt', 'lw')
    undead(id, class)
    count('replayed:' .. class, 1)
    make_ready(class, job[4] or '', id, false)
    emit('replayed', id, job[2], class, 0, fmt(replays))
    replayed[#replayed + 1] = id
  end
end
finish()
return {replayed, missing, skipped}
