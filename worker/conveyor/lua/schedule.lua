-- schedule: enqueue the job of one recurring schedule's tick, exactly once however many
-- schedulers run: the tick is recorded in the same step as the enqueue.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: schedule name, tick_ms, then one 13-field spec as in enqueue.lua (payload and
--       dedup_key taken from it)
-- Returns: {id, created} or {false, 0} when this tick (or a later one) was already enqueued.
local key = K_SCHEDULE .. ARGV[1]
local tick_ms = tonumber(ARGV[2])
local last = tonumber(redis.call('GET', key) or -1)
if last >= tick_ms then
  return {false, 0}
end
redis.call('SET', key, fmt(tick_ms))
local seq = redis.call('INCR', K_SEQ) - 1
local spec = {unpack(ARGV, 3, 15)}
local id, created = enqueue_one(seq, spec, spec[2], spec[9])
finish()
return {id, created}
