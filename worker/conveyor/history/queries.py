"""Reading the task history: one job's transitions and attempts, and counts over a time range.

Every function takes an open connection to a migrated history database (see
``schema.connect``) and a queue name, because one database may hold the history of many queues.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from conveyor.errors import ConfigError
from conveyor.history.schema import statement, translated

_LEASE_END = frozenset({"completed", "retried", "dead_lettered", "handed_back"})


@dataclass(frozen=True)
class JobEvent:
    """One transition of a job."""

    at: datetime
    kind: str
    attempt: int
    job_type: str
    priority: str
    detail: str
    """Per kind: ``started`` the lease token prefix, ``retried`` ``<reason>:<delay ms>``,
    ``completed`` the run time in ms, ``dead_lettered`` the reason, ``replayed`` the replay
    count, ``handed_back`` ``drain``, ``purged`` ``manual`` or ``retention``, ``queued`` empty or
    ``at:<due ms>`` for a delayed job."""
    worker: str = ""
    """The worker that held the lease, for ``started`` and the event that ended its attempt."""


@dataclass(frozen=True)
class Attempt:
    """One run of a job: from its ``started`` event to the event that ended it."""

    attempt: int
    worker: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None
    """``completed``, ``retried``, ``dead_lettered`` or ``handed_back``; None while it runs."""
    outcome_detail: str | None


@dataclass(frozen=True)
class StateCount:
    job_type: str
    priority: str
    state: str
    """``queued``, ``delayed``, ``active``, ``retrying``, ``completed``, ``dead`` or ``purged``."""
    jobs: int


def _worker_of(detail: str) -> str:
    return detail.rpartition("/")[0] if "/" in detail else detail


def job_history(
    conn: psycopg.Connection[Any], job_id: str, queue: str = "default"
) -> list[JobEvent]:
    """Every transition of one job, oldest first; empty if the history has none."""
    with translated("job_history"), conn.cursor(row_factory=class_row(JobEvent)) as cur:
        events = cur.execute(statement("job_events"), {"queue": queue, "job_id": job_id}).fetchall()
    out: list[JobEvent] = []
    holder = ""
    for event in events:
        if event.kind == "started":
            holder = _worker_of(event.detail)
            out.append(_with_worker(event, holder))
        elif event.kind in _LEASE_END and holder:
            out.append(_with_worker(event, holder))
            holder = ""
        else:
            out.append(event)
    return out


def _with_worker(event: JobEvent, worker: str) -> JobEvent:
    return JobEvent(
        event.at, event.kind, event.attempt, event.job_type, event.priority, event.detail, worker
    )


def job_attempts(
    conn: psycopg.Connection[Any], job_id: str, queue: str = "default"
) -> list[Attempt]:
    """Every attempt of one job, oldest first, with its outcome."""
    with translated("job_attempts"), conn.cursor(row_factory=class_row(Attempt)) as cur:
        return cur.execute(statement("job_attempts"), {"queue": queue, "job_id": job_id}).fetchall()


def state_counts(
    conn: psycopg.Connection[Any], since: datetime, until: datetime, queue: str = "default"
) -> list[StateCount]:
    """Jobs with any event in ``[since, until)``, counted by job type, priority class and the
    state they were in at ``until``. Times must be timezone-aware."""
    if since.tzinfo is None or until.tzinfo is None:
        raise ConfigError("since and until must be timezone-aware")
    with translated("state_counts"), conn.cursor(row_factory=class_row(StateCount)) as cur:
        return cur.execute(
            statement("state_counts"), {"queue": queue, "since": since, "until": until}
        ).fetchall()
