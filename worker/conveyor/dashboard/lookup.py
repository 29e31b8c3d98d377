"""One job, by id: its current record in Redis and, where PostgreSQL is configured, its history.

Redis forgets finished jobs (and purged dead letters); the history in PostgreSQL keeps every
transition, so the panel shows whichever exists. Without ``DATABASE_URL`` the history part says
it is unavailable rather than looking empty.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import asdict
from typing import Any

import orjson
import psycopg

from conveyor.errors import BackendError, JobNotFound
from conveyor.history import connect, job_attempts, job_history
from conveyor.job import JobInfo
from conveyor.queue import Queue

NO_DATABASE = "History is unavailable: the dashboard runs without DATABASE_URL."


def job_record(info: JobInfo) -> dict[str, Any]:
    """A job's Redis record as JSON, its payload decoded when it is JSON."""
    try:
        payload: Any = orjson.loads(info.payload)
    except orjson.JSONDecodeError:
        payload = {"undecodable_base64": base64.b64encode(info.payload).decode()}
    return asdict(info) | {"payload": payload}


class HistoryLookup:
    """Reads the history through one connection, opened on first use and again after a failure.

    Calls come from Starlette's thread pool; the lock keeps them off the connection at once.
    """

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def history(self, job_id: str, queue: str) -> dict[str, Any]:
        if not self.database_url:
            return {"available": False, "reason": NO_DATABASE}
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self.database_url)
                events = job_history(self._conn, job_id, queue)
                attempts = job_attempts(self._conn, job_id, queue)
            except BackendError as exc:
                self.close_locked()
                return {"available": False, "reason": f"History is unavailable: {exc}"}
        return {
            "available": True,
            "events": [asdict(e) | {"at": e.at.timestamp()} for e in events],
            "attempts": [
                asdict(a)
                | {
                    "started_at": a.started_at.timestamp(),
                    "ended_at": a.ended_at.timestamp() if a.ended_at else None,
                }
                for a in attempts
            ],
        }

    def close_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def lookup(queue: Queue, history: HistoryLookup, job_id: str) -> dict[str, Any]:
    """The job panel's content; ``job`` is None once Redis has forgotten the job."""
    try:
        record: dict[str, Any] | None = job_record(queue.get_job(job_id))
    except JobNotFound:
        record = None
    return {"id": job_id, "job": record, "history": history.history(job_id, queue.keys.queue)}
