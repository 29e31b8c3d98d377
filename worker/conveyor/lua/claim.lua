-- claim: lease up to n ready jobs of the given classes to one worker.
-- KEYS: the queue's key base (see _prelude.lua)
-- ARGV: n, lease_ttl_ms, token_prefix ('<worker id>/<claim number>'), k, then k classes in
--       strict priority order, then the worker's acks: triples id, lease_token, runtime_ms
--       (as ack.lua takes them; a busy worker's acks ride with its next claim instead of
--       costing a round trip and a script call of their own)
-- Returns: {now_ms, next_ms, stale, problem, job, job, ...} where next_ms is the earliest moment
--          (ms) at which more work of these classes may become claimable (-1: none known),
--          stale the ids of the acks whose lease was lost (see ack_leases), problem '' or the
--          error that stopped the claim early (see the end), and each job is
--          {id, token, class, type, payload, attempts, max_attempts, timeout_ms, group,
--          created_ms, queued_ms, version, lease_deadline_ms, alone}; attempts already counts
--          this run; alone is 1 when the job's last run died with its worker process (the worker
--          runs it with no other job beside it).
--
-- Order: strict priority between classes, except that a class starved past the queue's
-- starvation bound gets one job first; inside a class, groups take turns (a group that was
-- served goes to the back of its class's rotation); inside a group, FIFO. A group over its rate
-- limit is re-scored to the moment its limit allows and a paused group leaves the rotation, so
-- neither ever stands in front of a claimable job.
local n = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local prefix = ARGV[3]
local classes = {unpack(ARGV, 5, 4 + tonumber(ARGV[4]))}
local stale = ack_leases(5 + #classes, #ARGV)
local out = {NOW_MS, -1, stale, ''}

-- A read of a key that something else rewrote with another type: the error is reported in the
-- reply (the first one), and the claim goes on without that key.
local function guarded(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    if out[4] == '' then
      out[4] = reply.err
    end
    return nil
  end
  return reply
end

local function claim_jobs()
  local limits = {}
  local function limit_of(group)
    local spec = limits[group]
    if spec == nil then
      spec = guarded('HGET', K_LIMITS, group)
      if not spec and group ~= '' then
        spec = guarded('HGET', K_LIMITS, '*')
      end
      if spec and spec ~= '-' then
        local c, w = string.match(spec, '^(%d+):(%d+)$')
        c, w = tonumber(c), tonumber(w)
        -- A value Conveyor did not write ('ten a second', '0:1000') limits nothing: refusing
        -- every claim of the group over it would stall the queue. `rate-limit --list` shows it.
        if c and w and c >= 1 and w >= 1 then
          spec = {c, w}
        else
          spec = false
        end
      else
        spec = false
      end
      limits[group] = spec
    end
    return spec
  end

  -- GCRA: one stored timestamp per group; admits `count` jobs per `window` with bursts up to
  -- `count`. Returns 0 when admitted (and records it), else the ms at which it will be.
  local function admit(group)
    local spec = limit_of(group)
    if not spec then
      return 0
    end
    local interval = spec[2] / spec[1]
    local key = K_RATE .. group
    local tat = math.max(tonumber(guarded('GET', key)) or 0, NOW_MS)
    local allowed_at = tat - spec[2] + interval
    if allowed_at > NOW_MS then
      return math.ceil(allowed_at)
    end
    guarded('SET', key, fmt(tat + interval), 'PX', fmt(tat + interval - NOW_MS + 1))
    return 0
  end

  local paused_cache = {}
  local function is_paused(group)
    local p = paused_cache[group]
    if p == nil then
      p = guarded('SISMEMBER', K_PAUSED, group) == 1
      paused_cache[group] = p
    end
    return p
  end

  -- The head of each class's delayed set, kept for the sleep hint at the end: promoting moves
  -- due jobs out, so only a class that promoted needs reading again.
  local delayed_head = {}
  for _, class in ipairs(classes) do
    local head = guarded('ZRANGE', K_DELAYED .. class, 0, 0, 'WITHSCORES') or {}
    if head[2] and tonumber(head[2]) <= NOW_MS then
      promote(class, 1000)
      delayed_head[class] = 'read again'
    else
      delayed_head[class] = tonumber(head[2]) or false
    end
  end

  local claimed = 0
  local deadline = NOW_MS + ttl
  local FIELDS = {'t', 'p', 'a', 'm', 'o', 'g', 'ct', 'qt', 'v', 'lw'}

  local function lease(class, ids, leases)
    for _, id in ipairs(ids) do
      local key = K_JOB .. id
      local job = read_job(id, unpack(FIELDS))
      -- A job hash deleted behind Conveyor's back leaves a dangling id: nothing to run. A record
      -- that exists but lacks its fields is leased all the same, so the worker dead-letters it.
      if not job then
        dead_letter_unreadable(id, class)
      elseif job[1] or job[2] or job[3] or redis.call('EXISTS', key) == 1 then
        local attempts = attempts_of(job[3]) + 1
        local token = prefix .. ':' .. fmt(claimed)
        -- The class is written back from where the job was found: ack, fail and recovery find
        -- the lease by the record's class, which a record written by a foreign client may lack.
        redis.call('HSET', key, 's', 'active', 'a', fmt(attempts), 'lt', token, 'ld', fmt(deadline),
          'c', class)
        leases[#leases + 1] = fmt(deadline)
        leases[#leases + 1] = id
        emit('started', id, job[1], class, attempts, prefix)
        -- Cumulative: the operator tells a class that ran work between two polls from an idle one.
        count('started:' .. class, 1)
        claimed = claimed + 1
        out[#out + 1] = {id, token, class, job[1] or false, job[2] or false, attempts,
          field(job[4], 'm'), field(job[5], 'o'), job[6] or '', job[7] or false,
          job[8] or job[7] or false, job[9] or false, deadline, job[10] and 1 or 0}
      end
    end
  end

  -- Claim from one class until `limit` jobs are claimed in all or the class has none ready.
  local function serve_groups(class, limit, ready, leases)
    while claimed < limit do
      local heads = guarded('ZRANGE', ready, 0, 1, 'WITHSCORES') or {}
      if heads[1] == nil or tonumber(heads[2]) >= NOW_MS + 1 then
        break
      end
      local group = heads[1]
      local alone = heads[3] == nil or tonumber(heads[4]) >= NOW_MS + 1
      local wait_until = 0
      if is_paused(group) then
        redis.call('ZREM', ready, group)
      else
        wait_until = admit(group)
        if wait_until > 0 then
          redis.call('ZADD', ready, fmt(wait_until), group)
          count('deferred:' .. class, 1)
        else
          -- Groups take turns one job at a time; a group with no eligible rival (and no limit
          -- to count per job) may fill the rest of the batch in one pop.
          local take = 1
          if alone and not limit_of(group) then
            take = limit - claimed
          end
          local list = K_GROUP .. class .. ':' .. group
          -- A group list of another type holds nothing claimable: the group leaves the rotation.
          local ids = guarded('LPOP', list, take)
          if not ids then
            redis.call('ZREM', ready, group)
          else
            count('ready:' .. class, -#ids)
            if redis.call('LLEN', list) == 0 then
              redis.call('ZREM', ready, group)
            else
              redis.call('ZADD', ready, tick(), group)
            end
            lease(class, ids, leases)
          end
        end
      end
    end
  end

  local function serve(class, limit)
    local leases = {}
    local ok, failure = pcall(serve_groups, class, limit, K_READY .. class, leases)
    -- Leases first, then the error: a job already marked active must be where recovery looks.
    if #leases > 0 then
      redis.call('ZADD', K_LEASE .. class, unpack(leases))
    end
    if not ok then
      error(failure, 0)
    end
  end

  -- Aging (B22): strict priority alone would starve a lower class for as long as the higher ones
  -- stay busy. A lower class whose oldest group has waited past the starvation bound is served
  -- one job first; serving it moves that group to the back, so this repeats at most once per
  -- bound and the higher classes keep nearly all of the capacity.
  for i = 2, #classes do
    local head = guarded('ZRANGE', K_READY .. classes[i], 0, 0, 'WITHSCORES') or {}
    if claimed < n and head[2] and tonumber(head[2]) < NOW_MS - CONFIG.starvation_ms then
      serve(classes[i], claimed + 1)
    end
  end
  for _, class in ipairs(classes) do
    serve(class, n)
  end

  -- Tell the worker how long it may sleep: until the earliest delayed job or rate-limited group.
  -- A worker that got every job it asked for claims again at once and never reads the hint.
  local next_ms = -1
  for _, class in ipairs(classes) do
    if claimed >= n then
      break
    end
    local due = delayed_head[class]
    if due == 'read again' then
      local d = guarded('ZRANGE', K_DELAYED .. class, 0, 0, 'WITHSCORES') or {}
      due = tonumber(d[2]) or false
    end
    if due and (next_ms < 0 or due < next_ms) then
      next_ms = due
    end
    local r = guarded('ZRANGE', K_READY .. class, 0, 0, 'WITHSCORES') or {}
    if r[2] then
      local at = math.floor(tonumber(r[2]))
      if next_ms < 0 or at < next_ms then
        next_ms = at
      end
    end
  end
  out[2] = next_ms
end

-- A key of another type under one of the queue's names (something else wrote it) stops the
-- claim where it stands. The acks above and the jobs leased so far are recorded and returned
-- all the same, with the error: failing the whole call would leave the acks applied without
-- their events, and the leased jobs to wait out their leases.
local ok, failure = pcall(claim_jobs)
if not ok then
  out[4] = type(failure) == 'table' and failure.err or tostring(failure)
end
finish()
return out
