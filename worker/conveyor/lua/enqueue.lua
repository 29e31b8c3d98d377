-- enqueue: add jobs, honouring deduplication keys, in one atomic step.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: runs of jobs that share every option but payload and dedup key:
--       run_count, then per run: a 13-field spec (type, payload (unused), class, group,
--       max_attempts, timeout_ms, delay_ms (0 = none), run_at_ms (0 = none), dedup_key
--       (unused), dedup_window_ms, backoff_base_ms, backoff_cap_ms, jitter 1/0), the number of
--       jobs k, a flag keyed, then k pairs payload, dedup_key ('' = none) if keyed is 1, else
--       k payloads (a run in which no job has a dedup key)
-- Returns: when every job was created, {'+', now_ms, first_seq, count}: the ids are
--          '%013d-%016d' of now_ms and first_seq .. first_seq + count - 1 (see enqueue_one),
--          which spares a bulk enqueue thousands of reply strings; otherwise the flat array
--          id1, created1, id2, created2, ... (created: 1 new, 0 deduplicated)
local out = nil -- built only once a job is deduplicated (see Returns)

-- Job i of the call gets number seq + i, reserved here before anything is written: a call
-- that fails halfway leaves its numbers used, so no later call can hand out an id that a
-- half-written record already holds. (A deduplicated job leaves its number unused.)
local jobs, pos = 0, 2
for _ = 1, tonumber(ARGV[1]) do
  local k = tonumber(ARGV[pos + 13])
  jobs = jobs + k
  pos = pos + 15 + k * (ARGV[pos + 14] == '1' and 2 or 1)
end
local seq = redis.call('INCRBY', K_SEQ, jobs) - jobs
if seq + jobs >= 2 ^ 53 then
  -- From 2^53 on Lua numbers skip integers (the reply above is rounded too): two jobs would
  -- share an id.
  return redis.error_reply('job id sequence exhausted (2^53)')
end

local index = 0
pos = 2
buffered_pushes = {}
for _ = 1, tonumber(ARGV[1]) do
  local spec = {unpack(ARGV, pos, pos + 12)}
  local k = tonumber(ARGV[pos + 13])
  local keyed = ARGV[pos + 14] == '1'
  local stride = keyed and 2 or 1
  pos = pos + 15
  for _ = 1, k do
    local id, created = enqueue_one(seq + index, spec, ARGV[pos], keyed and ARGV[pos + 1] or '')
    if created == 0 and out == nil then
      out = {}
      for i = 0, index - 1 do
        out[#out + 1] = string.format('%013d-%016d', NOW_MS, seq + i)
        out[#out + 1] = 1
      end
    end
    if out then
      out[#out + 1] = id
      out[#out + 1] = created
    end
    index = index + 1
    pos = pos + stride
  end
end
flush_pushes()
finish()
return out or {'+', NOW_MS, seq, jobs}
