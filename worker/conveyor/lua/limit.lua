-- limit: set, exempt or clear the rate limit of a group ('*': the default of named groups),
-- and apply the new rule at once. A group deferred under the old limit sits in its class's
-- ready set at the moment that limit allowed (up to a whole old window away): it is moved back
-- to now, and its stored rate state is dropped so the new limit starts afresh.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: group, spec ('<count>:<window ms>', '-' for no limit, '' to clear), then the classes
-- Returns: the number of deferred groups moved back
local group, spec = ARGV[1], ARGV[2]
if spec == '' then
  redis.call('HDEL', K_LIMITS, group)
else
  redis.call('HSET', K_LIMITS, group, spec)
end
local moved = 0
for c = 3, #ARGV do
  local class = ARGV[c]
  local ready = K_READY .. class
  local deferred
  if group == '*' then
    deferred = redis.call('ZRANGEBYSCORE', ready, fmt(NOW_MS + 1), '+inf', 'LIMIT', 0, 10000)
  else
    local score = redis.call('ZSCORE', ready, group)
    deferred = (score and tonumber(score) >= NOW_MS + 1) and {group} or {}
  end
  for _, g in ipairs(deferred) do
    -- The default governs named groups without a limit of their own.
    if group ~= '*' or (g ~= '' and redis.call('HEXISTS', K_LIMITS, g) == 0) then
      redis.call('DEL', K_RATE .. g)
      redis.call('ZADD', ready, 'XX', tick(), g)
      moved = moved + 1
    end
  end
  if #deferred > 0 then
    wake(class)
  end
end
finish()
return moved
