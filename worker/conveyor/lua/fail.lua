-- fail: record failed attempts; each is retried after its backoff or dead-lettered.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: records of 7 fields: id, lease_token, reason, error_text, permanent (1/0),
--       backoff_base_ms, backoff_cap_ms (either < 0: use the job's own)
-- Returns: per record {id, outcome, delay_ms}; outcome is 'retry', 'dead' or 'stale'.
local out = {}
for i = 1, #ARGV, 7 do
  local id = ARGV[i]
  local class = check_lease(id, ARGV[i + 1])
  if not class then
    out[#out + 1] = {id, 'stale', 0}
  else
    local outcome, delay = fail_attempt(id, class, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4] == '1',
      tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]))
    out[#out + 1] = {id, outcome, delay}
  end
end
finish()
return out
