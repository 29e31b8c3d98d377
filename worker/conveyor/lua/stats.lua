-- stats: one consistent snapshot of the backlog, at Redis time.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: the classes
-- Returns: {now_ms, per class {class, ready, due_delayed, future_delayed, in_flight, dead,
--          oldest_ready_ms (-1: none), limited_groups, rate_limit_deferrals_total,
--          replayed_total}}
-- The oldest ready job is looked up among the first 100 groups of a class only, which bounds the
-- cost of a stats call; with more groups it can under-report the age.
local out = {NOW_MS}
for _, class in ipairs(ARGV) do
  local counts = redis.call('HMGET', K_COUNTS, 'ready:' .. class, 'dead:' .. class,
    'deferred:' .. class, 'replayed:' .. class)
  local delayed = K_DELAYED .. class
  local due = redis.call('ZCOUNT', delayed, '-inf', fmt(NOW_MS))
  local total_delayed = redis.call('ZCARD', delayed)
  local oldest = -1
  local groups = redis.call('ZRANGE', K_READY .. class, 0, 99)
  for _, group in ipairs(groups) do
    -- pcall: a group list that something else rewrote with another type shows no age.
    local id = redis.pcall('LINDEX', K_GROUP .. class .. ':' .. group, 0)
    if type(id) == 'string' then
      -- A job that never waited before has no 'qt' yet: it became ready when it was created.
      local times = read_job(id, 'qt', 'ct') or {}
      local qt = tonumber(times[1] or times[2])
      if qt and (oldest < 0 or qt < oldest) then
        oldest = qt
      end
    end
  end
  local limited = redis.call('ZCOUNT', K_READY .. class, fmt(NOW_MS + 1), '+inf')
  out[#out + 1] = {class, tonumber(counts[1]) or 0, due, total_delayed - due,
    redis.call('ZCARD', K_LEASE .. class), tonumber(counts[2]) or 0, oldest, limited,
    tonumber(counts[3]) or 0, tonumber(counts[4]) or 0}
end
return out
