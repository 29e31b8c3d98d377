"""Task history in PostgreSQL: every job transition, kept after Redis has forgotten the job.

The Lua scripts record each transition in the queue's ``events`` stream in the same atomic
step as the change itself; ``writer`` copies the stream into ``conveyor.job_event`` (schema in
``migrations/``, statements in ``queries.sql``) and ``queries`` reads it back.
"""

from conveyor.history.queries import (
    Attempt,
    JobEvent,
    StateCount,
    job_attempts,
    job_history,
    state_counts,
)
from conveyor.history.schema import connect, migrate
from conveyor.history.writer import GROUP, HistoryWriter, writer_for

__all__ = [
    "GROUP",
    "Attempt",
    "HistoryWriter",
    "JobEvent",
    "StateCount",
    "connect",
    "job_attempts",
    "job_history",
    "migrate",
    "state_counts",
    "writer_for",
]
