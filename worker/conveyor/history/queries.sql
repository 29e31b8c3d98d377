-- Every statement Conveyor's history runs, each under a name the Python code looks up.
-- A block starts with "-- name: <name>" and a line saying what the statement does; psycopg
-- fills the %(...)s parameters.

-- name: lock_schema
-- Serialises schema changes of concurrent starters until the end of the transaction.
SELECT pg_advisory_xact_lock(hashtext('conveyor.history'));

-- name: create_schema
-- The schema and the table recording which numbered migrations it has had.
CREATE SCHEMA IF NOT EXISTS conveyor;
CREATE TABLE IF NOT EXISTS conveyor.schema_version (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: schema_versions
-- Numbers of the migrations already applied.
SELECT version FROM conveyor.schema_version;

-- name: record_version
-- Marks one migration as applied, in the transaction that applied it.
INSERT INTO conveyor.schema_version (version, name) VALUES (%(version)s, %(name)s);

-- name: create_staging
-- The writer's per-connection landing table for COPY; emptied at every commit.
CREATE TEMPORARY TABLE IF NOT EXISTS job_event_staging
    (LIKE conveyor.job_event) ON COMMIT DELETE ROWS;

-- name: copy_staging
-- Stream events, one row each, into the landing table.
COPY job_event_staging
    (queue, entry_ms, entry_seq, position, at, kind, job_id, job_type, priority, attempt, detail)
FROM STDIN;

-- name: insert_staged
-- Landed events into the history; an event already stored (same entry, same position) is
-- skipped, which makes writing an entry twice harmless.
INSERT INTO conveyor.job_event
SELECT * FROM job_event_staging
ON CONFLICT (queue, entry_ms, entry_seq, position) DO NOTHING;

-- name: job_events
-- Every transition of one job, oldest first.
SELECT at, kind, attempt, job_type, priority, detail
FROM conveyor.job_event
WHERE queue = %(queue)s AND job_id = %(job_id)s
ORDER BY entry_ms, entry_seq, position;

-- name: job_attempts
-- Every attempt of one job, oldest first, with the event that ended it.
SELECT attempt, worker, started_at, ended_at, outcome, outcome_detail
FROM conveyor.attempt
WHERE queue = %(queue)s AND job_id = %(job_id)s
ORDER BY entry_ms, entry_seq, position;

-- name: state_counts
-- Jobs with at least one event in [since, until), counted by job type, priority class and the
-- state their last event before `until` left them in.
SELECT job_type, priority, state, count(*) AS jobs
FROM (
    SELECT DISTINCT ON (job_id)
        job_type,
        priority,
        CASE kind
            WHEN 'completed' THEN 'completed'
            WHEN 'dead_lettered' THEN 'dead'
            WHEN 'purged' THEN 'purged'
            WHEN 'started' THEN 'active'
            WHEN 'retried' THEN 'retrying'
            WHEN 'queued' THEN CASE WHEN detail LIKE 'at:%%' THEN 'delayed' ELSE 'queued' END
            ELSE 'queued'
        END AS state
    FROM conveyor.job_event
    WHERE queue = %(queue)s AND at >= %(since)s AND at < %(until)s
    ORDER BY job_id, entry_ms DESC, entry_seq DESC, position DESC
) AS last_event
GROUP BY job_type, priority, state
ORDER BY job_type, priority, state;
