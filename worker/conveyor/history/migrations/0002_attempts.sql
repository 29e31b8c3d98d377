-- 0002: one row per attempt (a `started` event) with the event that ended it.
--
-- The outcome is the next of the job's lease events after the start; while the attempt runs
-- (or if its end was never recorded) outcome, ended_at and outcome_detail are NULL. The worker
-- is the started event's lease token prefix: '<worker id>/<claim number>' minus the claim.

CREATE VIEW conveyor.attempt AS
SELECT
    queue,
    job_id,
    job_type,
    priority,
    attempt,
    regexp_replace(detail, '/[^/]*$', '') AS worker,
    at AS started_at,
    entry_ms,
    entry_seq,
    position,
    CASE WHEN next_kind <> 'started' THEN next_kind END AS outcome,
    CASE WHEN next_kind <> 'started' THEN next_at END AS ended_at,
    CASE WHEN next_kind <> 'started' THEN next_detail END AS outcome_detail
FROM (
    SELECT
        e.*,
        lead(kind) OVER lease_events AS next_kind,
        lead(at) OVER lease_events AS next_at,
        lead(detail) OVER lease_events AS next_detail
    FROM conveyor.job_event AS e
    WHERE kind IN ('started', 'completed', 'retried', 'dead_lettered', 'handed_back')
    WINDOW lease_events AS (PARTITION BY queue, job_id ORDER BY entry_ms, entry_seq, position)
) AS lease_steps
WHERE kind = 'started';
