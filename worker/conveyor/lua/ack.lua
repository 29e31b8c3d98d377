-- ack: record successful attempts.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: triples id, lease_token, runtime_ms
-- Returns: the ids whose token was stale (lease lost); those jobs are left untouched.
local stale = ack_leases(1, #ARGV)
finish()
return stale
