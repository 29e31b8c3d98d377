-- enqueue: add jobs, honouring deduplication keys, in one atomic step.
-- KEYS: the queue keyspace (see _prelude.lua)
-- ARGV: runs of jobs that share every option but payload and dedup key:
--       run_count, then per run: a 13-field spec (type, payload (unused), class, group,
--       max_attempts, timeout_ms, delay_ms (0 = none), run_at_ms (0 = none), dedup_key
--       (unused), dedup_window_ms, backoff_base_ms, backoff_cap_ms, jitter 1/0), the number of
--       jobs k, then k pairs payload, dedup_key ('' = none)
-- Returns: flat array id1, created1, id2, created2, ... (created: 1 new, 0 deduplicated)
local out = {}
local pos = 2
local seq = tonumber(redis.call('GET', K_SEQ) or 0)
local total = 0
for _ = 1, tonumber(ARGV[1]) do
  local spec = {unpack(ARGV, pos, pos + 12)}
  local k = tonumber(ARGV[pos + 13])
  pos = pos + 14
  for _ = 1, k do
    local id, created = enqueue_one(seq + total, spec, ARGV[pos], ARGV[pos + 1])
    out[#out + 1] = id
    out[#out + 1] = created
    total = total + 1
    pos = pos + 2
  end
end
redis.call('SET', K_SEQ, fmt(seq + total))
finish()
return out
