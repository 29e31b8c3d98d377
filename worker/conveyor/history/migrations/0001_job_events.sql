-- 0001: one row per job transition, copied from a queue's events stream.
--
-- A stream entry holds every event of one kind written by one script call; `position` is the
-- event's index inside that entry, so (queue, entry_ms, entry_seq, position) names an event
-- for good and a second copy of the same entry inserts nothing.

CREATE TABLE conveyor.job_event (
    queue     text        NOT NULL,
    entry_ms  bigint      NOT NULL,  -- stream entry id, milliseconds part (Redis time)
    entry_seq bigint      NOT NULL,  -- stream entry id, sequence part
    position  integer     NOT NULL,  -- index of the event inside its entry
    at        timestamptz NOT NULL,  -- entry_ms as a timestamp, for range queries
    kind      text        NOT NULL,  -- queued, started, retried, completed, dead_lettered, ...
    job_id    text        NOT NULL,
    job_type  text        NOT NULL,
    priority  text        NOT NULL,  -- priority class
    attempt   integer     NOT NULL,
    detail    text        NOT NULL,  -- per kind: worker/claim, reason:delay_ms, runtime ms, ...
    PRIMARY KEY (queue, entry_ms, entry_seq, position)
);

CREATE INDEX job_event_by_job ON conveyor.job_event (queue, job_id);
CREATE INDEX job_event_by_time ON conveyor.job_event (queue, at);
