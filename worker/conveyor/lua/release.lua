-- release: a worker process is known to be dead (its supervisor saw it exit without draining):
-- recover its leases now, as failed attempts with reason worker_lost, instead of letting them
-- sit until they expire. Scans the lease sets of the given classes, so it suits a rare event
-- (a crash), not a loop. Leases the worker no longer holds are left alone.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: the worker's lease-token prefix ('<worker id>/'), a message, then the classes
-- Returns: the number of leases recovered
local prefix, message = ARGV[1], ARGV[2]
local released = 0
for c = 3, #ARGV do
  local class = ARGV[c]
  for _, id in ipairs(redis.call('ZRANGE', K_LEASE .. class, 0, -1)) do
    local job = read_job(id, 's', 'lt')
    if job and job[1] == 'active' and job[2] and string.sub(job[2], 1, #prefix) == prefix then
      if fail_attempt(id, class, 'worker_lost', message, false, -1, -1) == 'retry' then
        -- Its process died during the run, maybe because of this job (out of memory, a crash
        -- in native code): its next run goes alone, so a poison job takes no other job down
        -- with it again. (A lease that merely expired, a late heartbeat, marks nothing.)
        redis.call('HSET', K_JOB .. id, 'lw', '1')
      end
      released = released + 1
    end
  end
end
finish()
return released
