-- resume: let a paused group's jobs be claimed again.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: group, then the classes
-- Returns: 1 if the group was paused, else 0.
local group = ARGV[1]
local was_paused = redis.call('SREM', K_PAUSED, group)
for c = 2, #ARGV do
  local class = ARGV[c]
  if redis.call('LLEN', K_GROUP .. class .. ':' .. group) > 0 then
    redis.call('ZADD', K_READY .. class, 'NX', tick(), group)
    wake(class)
  end
end
finish()
return was_paused
