-- The shared part of Conveyor's function library (see scripts.py): key names, clock, and the
-- steps several operations share. It runs once when the library is loaded; begin() sets up the
-- state of one call (time, key names, buffers), and every operation calls it first.
--
-- KEYS[1]: the queue's key base, '<prefix>:{<queue>}:'. Every key a script touches is the base,
--          one of the suffixes below (keys.SCRIPT_KEY_NAMES, same order) and for some an id,
--          class or group, so all of them share the queue's hash tag and cluster slot. One key
--          rather than twenty: every argument costs the caller an encode and Redis a parse on
--          every call, and the pickup of an idle worker pays for two calls.
-- Times: milliseconds from Redis TIME, never from the caller. Group rotation scores add a
--        binary fraction of a millisecond per use (tick) so that groups served within one
--        call keep their order; a score below NOW_MS + 1 therefore means "claimable now".
-- Numbers: always passed to redis.call through fmt(), because Lua's default number-to-string
--          conversion switches to exponent notation above 14 digits.

local KEY_SUFFIXES = {'job:', 'err:', 'ready:', 'group:', 'delayed:', 'lease:', 'dead', 'dedup:',
  'rate:', 'limits', 'paused', 'wake:', 'events', 'seq', 'counts', 'workers', 'worker:',
  'schedule:', 'config', 'dead_class'}
-- The call's KEYS and ARGV, and the key names built from KEYS[1] (see begin()).
local KEYS, ARGV
local K_JOB, K_ERR, K_READY, K_GROUP, K_DELAYED, K_LEASE, K_DEAD, K_DEDUP, K_RATE,
  K_LIMITS, K_PAUSED, K_WAKE, K_EVENTS, K_SEQ, K_COUNTS, K_WORKERS, K_WORKER, K_SCHEDULE,
  K_CONFIG, K_DEAD_CLASS
-- Per key base, built once per library load: a server holds a handful of queues.
local key_names = {}
local function keyspace(base)
  local names = key_names[base]
  if names == nil then
    names = {}
    for i, suffix in ipairs(KEY_SUFFIXES) do
      names[i] = base .. suffix
    end
    key_names[base] = names
  end
  return unpack(names)
end

local function fmt(n)
  return string.format('%d', n)
end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local NOW_MS

-- Defaults of the sparse job fields: enqueue stores only the fields that differ from these.
local DEFAULTS = {g = '', m = '3', o = '300000', bb = '1000', bc = '3600000', bj = '1'}
local function field(value, name)
  if value == false or value == nil then
    return DEFAULTS[name]
  end
  return value
end
-- A numeric field as a number; a value some foreign writer left unreadable counts as the
-- default, so arithmetic on it cannot abort a script halfway through its writes.
local function finite(n)
  return n ~= nil and n == n and n ~= math.huge and n ~= -math.huge
end
local function numeric(value, name)
  local n = tonumber(field(value, name))
  if finite(n) then
    return n
  end
  return tonumber(DEFAULTS[name])
end
-- A job's attempt count: a whole number >= 0 ('inf' or 'nan' from a foreign writer would
-- otherwise break the event's JSON and abort the claim after its pops).
local function attempts_of(value)
  local n = tonumber(value)
  if not finite(n) or n < 0 then
    return 0
  end
  return math.floor(n)
end
local tick_n
local function tick()
  tick_n = math.min(tick_n + 1, 1023)
  return string.format('%.4f', NOW_MS + tick_n / 1024)
end

-- Queue-wide settings, read once per call; QueueConfig in config.py documents each one.
local CONFIG
local function read_config()
  local raw = redis.call('HMGET', K_CONFIG, 'done_ttl_ms', 'dead_max', 'dead_ttl_ms', 'events_max',
    'starvation_ms')
  return {
    done_ttl_ms = tonumber(raw[1]) or 0,
    dead_max = tonumber(raw[2]) or 100000,
    dead_ttl_ms = tonumber(raw[3]) or 7 * 24 * 3600 * 1000,
    events_max = tonumber(raw[4]) or 1000000,
    starvation_ms = tonumber(raw[5]) or 10000,
  }
end

-- Transitions are buffered per event kind and written by finish() as one stream entry per
-- kind per call: {e = kind, d = JSON array of [job id, job type, class, attempt, detail]}.
-- The history writer expands them into PostgreSQL rows; the entry id carries the time.
-- The stream is capped (approximately, in entries) so that a history writer that is down for
-- days cannot exhaust Redis memory; the writer warns long before the cap is reached.
local events, event_order
local function emit(event, id, jtype, class, attempt, detail)
  local list = events[event]
  if list == nil then
    list = {}
    events[event] = list
    event_order[#event_order + 1] = event
  end
  list[#list + 1] = {id, jtype or '', class or '', tonumber(attempt) or 0, detail or ''}
end

-- A job queued ready by enqueue_one gets the next id of a consecutive range, so a bulk
-- enqueue writes one record per run of them, {now_ms, first_seq, count, type, class} (numbers
-- as strings: cjson rounds above 14 digits), in an entry of kind 'queued_run'; the history
-- reader expands it into one 'queued' row per id. One record per job cost a fifth of a bulk
-- enqueue's time in Redis.
local queued_runs
local function emit_queued(seq, jtype, class)
  local last = queued_runs[#queued_runs]
  if last and last.next == seq and last[4] == jtype and last[5] == class then
    last.next = seq + 1
    last[3] = fmt(seq + 1 - last.first)
  else
    queued_runs[#queued_runs + 1] = {fmt(NOW_MS), fmt(seq), '1', jtype, class, first = seq,
      next = seq + 1}
  end
end

local woken
local function wake(class)
  woken[class] = true
end

-- Counter changes are summed per call and written once at the end (see finish()).
local pending_counts
local function count(field, delta)
  pending_counts[field] = (pending_counts[field] or 0) + delta
end

-- Groups known to be in ready:<class> during this call, so a batch of jobs for one group
-- costs one ZADD, not one per job.
local ready_seen

-- Idle workers block on wake:<class>; a few tokens per class per call are enough to start
-- every idle worker, because a woken worker keeps claiming until the class runs dry.
local WAKE_TOKENS = 8

-- Every script that changes state calls this last: it writes the buffered events, the summed
-- counters and the wake-up tokens.
local function finish()
  for _, event in ipairs(event_order) do
    redis.call('XADD', K_EVENTS, 'MAXLEN', '~', fmt(CONFIG.events_max), '*',
      'e', event, 'd', cjson.encode(events[event]))
  end
  if #queued_runs > 0 then
    for _, run in ipairs(queued_runs) do
      run.first, run.next = nil, nil
    end
    redis.call('XADD', K_EVENTS, 'MAXLEN', '~', fmt(CONFIG.events_max), '*',
      'e', 'queued_run', 'd', cjson.encode(queued_runs))
  end
  for field, delta in pairs(pending_counts) do
    if delta ~= 0 then
      redis.call('HINCRBY', K_COUNTS, field, delta)
    end
  end
  -- Waking is a courtesy (idle workers also look every sweep interval), so a wake-up key of
  -- another type must not fail a call whose work is all done by now.
  for class, _ in pairs(woken) do
    local key = K_WAKE .. class
    redis.pcall('RPUSH', key, '1', '1', '1', '1', '1', '1', '1', '1')
    redis.pcall('LTRIM', key, -WAKE_TOKENS, -1)
  end
end

-- enqueue.lua collects the ids it appends to each group list and writes them with one RPUSH
-- per list (flush_pushes) instead of one per job. Only a script that reads no group list
-- before flushing may turn this on: an id still in the buffer is not in its list yet.
local buffered_pushes, push_order

local function flush_pushes()
  for _, list in ipairs(push_order) do
    local ids = buffered_pushes[list]
    -- unpack() is bounded by Lua's C stack (LUAI_MAXCSTACK, 8000): push in slices.
    for i = 1, #ids, 4000 do
      redis.call('RPUSH', list, unpack(ids, i, math.min(i + 3999, #ids)))
    end
  end
  buffered_pushes, push_order = {}, {}
end

local function make_ready(class, group, id, front)
  local list = K_GROUP .. class .. ':' .. group
  if front then
    redis.call('LPUSH', list, id)
  elseif buffered_pushes then
    local ids = buffered_pushes[list]
    if ids == nil then
      ids = {}
      buffered_pushes[list] = ids
      push_order[#push_order + 1] = list
    end
    ids[#ids + 1] = id
  else
    redis.call('RPUSH', list, id)
  end
  local seen = class .. ':' .. group
  if not ready_seen[seen] then
    -- NX keeps a rate-limited group's future score: new work does not jump its limit.
    redis.call('ZADD', K_READY .. class, 'NX', tick(), group)
    ready_seen[seen] = true
  end
  count('ready:' .. class, 1)
  wake(class)
end

local function schedule_at(class, id, due_ms)
  local key = K_DELAYED .. class
  local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  redis.call('ZADD', key, fmt(due_ms), id)
  -- A sleeping worker computed its timeout from the old head; an earlier due time must wake it.
  if head[2] == nil or due_ms < tonumber(head[2]) then
    wake(class)
  end
end

-- Fields of a job's record, or false when its key holds another type (something else wrote
-- under a job's name). A read error would abort the script after its first writes, and Redis
-- does not roll a script back: a claim would lose every id it had already popped.
local function read_job(id, ...)
  local job = redis.pcall('HMGET', K_JOB .. id, ...)
  if job.err then
    return false
  end
  return job
end

-- An id whose record is of another type can neither run nor hold state: it is filed in the
-- dead-letter index as it is (dlq list shows it as unreadable; purge deletes it).
local function dead_letter_unreadable(id, class)
  redis.call('ZADD', K_DEAD, fmt(NOW_MS), id)
  redis.call('HSET', K_DEAD_CLASS, id, class)
  count('dead:' .. class, 1)
  emit('dead_lettered', id, '', class, 0, 'invalid_job')
end

-- Move due delayed jobs of one class into their group lists.
local function promote(class, limit)
  local key = K_DELAYED .. class
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', fmt(NOW_MS), 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local job = read_job(id, 's', 'g')
    if not job then
      dead_letter_unreadable(id, class)
    elseif job[1] then
      redis.call('HSET', K_JOB .. id, 's', 'queued', 'qt', fmt(NOW_MS))
      make_ready(class, job[2] or '', id, false)
    end
  end
  if #due > 0 then
    redis.call('ZREM', key, unpack(due))
  end
  return #due
end

-- A dead letter leaves the index (replay, purge, retention): its class's counter drops. The
-- class is kept beside the index because the job's record may be gone by then (deleted by
-- hand, or by an eviction) and the counter would otherwise never come down. Returns the class.
local function undead(id, class_in_record)
  local class = redis.call('HGET', K_DEAD_CLASS, id) or class_in_record
  redis.call('HDEL', K_DEAD_CLASS, id)
  if class then
    count('dead:' .. class, -1)
  end
  return class
end

local function dead_letter_trim()
  local expired = redis.call('ZRANGEBYSCORE', K_DEAD, '-inf', fmt(NOW_MS - CONFIG.dead_ttl_ms),
    'LIMIT', 0, 100)
  local excess = redis.call('ZCARD', K_DEAD) - #expired - CONFIG.dead_max
  if excess > 0 then
    local oldest = redis.call('ZRANGE', K_DEAD, #expired, #expired + math.min(excess, 100) - 1)
    for _, id in ipairs(oldest) do
      expired[#expired + 1] = id
    end
  end
  for _, id in ipairs(expired) do
    local job = read_job(id, 't', 'c', 'a') or {}
    redis.call('DEL', K_JOB .. id, K_ERR .. id)
    redis.call('ZREM', K_DEAD, id)
    emit('purged', id, job[1], undead(id, job[2]), job[3], 'retention')
  end
end

local function dead_letter(id, jtype, class, attempt, reason)
  redis.call('HSET', K_JOB .. id, 's', 'dead', 'dr', reason, 'dt', fmt(NOW_MS))
  redis.call('HDEL', K_JOB .. id, 'lt', 'ld')
  redis.call('ZADD', K_DEAD, fmt(NOW_MS), id)
  redis.call('HSET', K_DEAD_CLASS, id, class)
  count('dead:' .. class, 1)
  emit('dead_lettered', id, jtype, class, attempt, reason)
  dead_letter_trim()
end

-- The end of a leased attempt that did not succeed: record the error, then retry after an
-- exponential backoff (full jitter unless the job turned jitter off) or dead-letter.
-- base_ms / cap_ms < 0 mean "use the job's own backoff".
local function fail_attempt(id, class, reason, message, permanent, base_ms, cap_ms)
  local key = K_JOB .. id
  local job = redis.call('HMGET', key, 't', 'a', 'm', 'bb', 'bc', 'bj', 'lt')
  local attempt = attempts_of(job[2])
  local max_attempts = numeric(job[3], 'm')
  redis.call('ZREM', K_LEASE .. class, id)
  -- A lease token is '<worker id>/<claim>:<n>', so the failed run's worker is its prefix.
  local worker = string.match(job[7] or '', '^(.*)/') or ''
  -- pcall: an error list that something else rewrote with another type loses this record,
  -- not the job (the lease is already gone from its set).
  redis.pcall('RPUSH', K_ERR .. id, cjson.encode({
    attempt = attempt, reason = reason, error = message, at = NOW_MS, worker = worker,
  }))
  if permanent or attempt >= max_attempts then
    dead_letter(id, job[1], class, attempt, reason)
    return 'dead', 0
  end
  if base_ms < 0 then base_ms = numeric(job[4], 'bb') end
  if cap_ms < 0 then cap_ms = numeric(job[5], 'bc') end
  local delay = math.min(cap_ms, base_ms * 2 ^ math.max(attempt - 1, 0))
  if field(job[6], 'bj') ~= '0' then
    delay = math.random() * delay
  end
  delay = math.floor(delay)
  redis.call('HSET', key, 's', 'delayed')
  redis.call('HDEL', key, 'lt', 'ld', 'lw')
  schedule_at(class, id, NOW_MS + delay)
  emit('retried', id, job[1], class, attempt, reason .. ':' .. fmt(delay))
  return 'retry', delay
end

-- Returns the job's class when `token` is its current lease, or false: a stale token (lease
-- expired and recovered, job already finished or handed back) must change nothing.
local function check_lease(id, token)
  local job = read_job(id, 's', 'lt', 'c')
  if not job or job[1] ~= 'active' or job[2] ~= token then
    return false
  end
  return job[3]
end

-- Record successful attempts given as triples id, lease_token, runtime_ms in ARGV[first..last]
-- (ack.lua, and claim.lua, which takes a worker's acks along with its next claim). Returns the
-- ids whose token was stale (lease expired and recovered, or job already finished): those
-- jobs are left untouched, so no job completes twice.
local function ack_leases(first, last)
  local stale = {}
  local leases = {}
  local gone = {}
  for i = first, last, 3 do
    local id, token = ARGV[i], ARGV[i + 1]
    local key = K_JOB .. id
    local job = read_job(id, 's', 'lt', 'c', 't', 'a')
    if not job or job[1] ~= 'active' or job[2] ~= token then
      stale[#stale + 1] = id
    else
      local class = job[3]
      leases[class] = leases[class] or {}
      table.insert(leases[class], id)
      emit('completed', id, job[4], class, job[5], ARGV[i + 2])
      -- History lives in PostgreSQL; Redis keeps a finished job only if retention asks for it.
      if CONFIG.done_ttl_ms > 0 then
        redis.call('HSET', key, 's', 'done', 'ft', fmt(NOW_MS))
        redis.call('HDEL', key, 'lt', 'ld')
        redis.call('PEXPIRE', key, CONFIG.done_ttl_ms)
        redis.call('PEXPIRE', K_ERR .. id, CONFIG.done_ttl_ms)
      else
        gone[#gone + 1] = key
        gone[#gone + 1] = K_ERR .. id
      end
    end
  end
  for class, ids in pairs(leases) do
    redis.call('ZREM', K_LEASE .. class, unpack(ids))
  end
  -- unpack() is bounded by Lua's C stack: a worker sends at most a thousand acks per call.
  if #gone > 0 then
    redis.call('UNLINK', unpack(gone))
  end
  return stale
end

-- The fields of a job's record that every job of one spec shares, built once per spec (a
-- batch sends thousands of jobs under one spec).
local function shared_fields(spec, delayed)
  local fields = {'v', '1', 't', spec[1], 'c', spec[3], 'ct', fmt(NOW_MS),
    's', delayed and 'delayed' or 'queued'}
  for name, i in pairs({g = 4, m = 5, o = 6, bb = 11, bc = 12, bj = 13}) do
    if spec[i] ~= DEFAULTS[name] then
      fields[#fields + 1] = name
      fields[#fields + 1] = spec[i]
    end
  end
  return fields
end

-- Enqueue one job (or return the id already holding its deduplication key). `spec` is the
-- 13-field record of enqueue.lua; `payload` and `dedup_key` come per job. `seq` comes from one
-- INCRBY per call. Returns id, 1 when created / 0 when deduplicated.
local function enqueue_one(seq, spec, payload, dedup_key)
  if dedup_key ~= '' then
    -- A key of another type under the dedup name holds no job id: SET below replaces it.
    local existing = redis.pcall('GET', K_DEDUP .. dedup_key)
    if type(existing) == 'string' then
      return existing, 0
    end
  end
  -- Creation ms, then the whole queue sequence at fixed width, so ids sort by creation; a
  -- wrapping suffix would break the order every million jobs and could repeat an id within
  -- one millisecond. The sequence is a Lua number, exact up to 2^53: 285 years at a million
  -- jobs a second.
  local id = string.format('%013d-%016d', NOW_MS, seq)
  local jtype, class, group = spec[1], spec[3], spec[4]
  if spec.due == nil then
    spec.due = 0
    if tonumber(spec[7]) > 0 then
      spec.due = NOW_MS + tonumber(spec[7])
    elseif tonumber(spec[8]) > 0 then
      spec.due = tonumber(spec[8])
    end
    spec.delayed = spec.due > NOW_MS
    spec.fields = shared_fields(spec, spec.delayed)
  end
  local due, delayed = spec.due, spec.delayed
  local key = K_JOB .. id
  if dedup_key == '' and not delayed then
    redis.call('HSET', key, 'p', payload, unpack(spec.fields))
  else
    local hash = {'p', payload, unpack(spec.fields)}
    if dedup_key ~= '' then
      hash[#hash + 1] = 'dk'
      hash[#hash + 1] = dedup_key
      redis.call('SET', K_DEDUP .. dedup_key, id, 'PX', spec[10])
    end
    if delayed then
      hash[#hash + 1] = 'ra'
      hash[#hash + 1] = fmt(due)
    end
    redis.call('HSET', key, unpack(hash))
  end
  if delayed then
    schedule_at(class, id, due)
    emit('queued', id, jtype, class, 0, 'at:' .. fmt(due))
  else
    make_ready(class, group, id, false)
    emit_queued(seq, jtype, class)
  end
  return id, 1
end

-- Every operation starts here: the call's time, key names, settings and empty buffers (the
-- library's locals outlive a call, so nothing of the previous call may leak into this one).
local function begin(keys, args)
  KEYS, ARGV = keys, args
  K_JOB, K_ERR, K_READY, K_GROUP, K_DELAYED, K_LEASE, K_DEAD, K_DEDUP, K_RATE,
    K_LIMITS, K_PAUSED, K_WAKE, K_EVENTS, K_SEQ, K_COUNTS, K_WORKERS, K_WORKER, K_SCHEDULE,
    K_CONFIG, K_DEAD_CLASS = keyspace(keys[1])
  NOW_MS = clock()
  tick_n = 0
  CONFIG = read_config()
  events, event_order, queued_runs, woken, pending_counts, ready_seen = {}, {}, {}, {}, {}, {}
  buffered_pushes, push_order = nil, {}
end

-- The operations follow, one function each (see scripts.py).
