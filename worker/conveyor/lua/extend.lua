-- extend: push lease deadlines forward (heartbeat of long jobs).
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: lease_ttl_ms, then pairs id, lease_token
-- Returns: {deadline_ms, stale ids...}; a stale id's lease was lost and its run must not ack.
local deadline = NOW_MS + tonumber(ARGV[1])
local out = {deadline}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local class = check_lease(id, ARGV[i + 1])
  if not class then
    out[#out + 1] = id
  else
    redis.call('HSET', K_JOB .. id, 'ld', fmt(deadline))
    redis.call('ZADD', K_LEASE .. class, 'XX', fmt(deadline), id)
  end
end
return out
