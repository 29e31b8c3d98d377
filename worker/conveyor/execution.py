"""Turning a leased job into a handler call, and the handler's end into an outcome.

Decoding happens here, inside the job's own task, so a payload that cannot be decoded or a job
type with no handler becomes a dead letter with a reason instead of an exception in the
worker's loop.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import orjson

from conveyor.errors import PermanentError
from conveyor.job import SCHEMA_VERSION, Job
from conveyor.leases import Claimed, Failure
from conveyor.registry import Registry, TaskDef

MAX_ERROR_TEXT = 8192
"""Characters of an error's text and traceback kept per attempt."""

TIMEOUT = "conveyor:timeout"
SHUTDOWN = "conveyor:shutdown"
LEASE_LOST = "conveyor:lease_lost"
"""Messages of the CancelledError a handler sees, so its cleanup can tell why it was stopped."""


class Poison(Exception):
    """A leased job that can never run: it is dead-lettered with ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Prepared:
    job: Job
    task: TaskDef


def prepare(claimed: Claimed, registry: Registry) -> Prepared:
    """Decode a leased job and find its handler, or raise ``Poison``."""
    if claimed.type is None or claimed.payload is None:
        raise Poison("invalid_job", "job record lacks its type or payload")
    if claimed.version != SCHEMA_VERSION:
        raise Poison("invalid_job", f"job schema version {claimed.version!r:.40} is not supported")
    if claimed.malformed:
        raise Poison("invalid_job", f"job record is malformed: {claimed.malformed}")
    task = registry.get(claimed.type)
    if task is None:
        # A foreign record's type can be megabytes long: the message shows enough to find it.
        raise Poison(
            "unknown_job_type", f"no handler registered for job type {claimed.type!r:.200}"
        )
    try:
        payload = orjson.loads(claimed.payload)
    except orjson.JSONDecodeError as exc:
        raise Poison("decode_error", f"payload is not valid JSON: {exc}") from exc
    created = (claimed.created_ms or 0) / 1000
    job = Job(
        id=claimed.id,
        type=claimed.type,
        payload=payload,
        priority=claimed.priority,
        group=claimed.group,
        attempt=claimed.attempt,
        max_attempts=claimed.max_attempts,
        timeout=claimed.timeout_ms / 1000,
        created_at=created,
        queued_at=(claimed.queued_ms or 0) / 1000 or created,
        lease_token=claimed.token,
        lease_deadline=claimed.lease_deadline_ms / 1000,
    )
    return Prepared(job, task)


def describe(exc: BaseException) -> str:
    """The error text kept with an attempt; never raises, whatever the exception holds."""
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:  # noqa: BLE001 - an exception that cannot even be formatted
        text = f"{type(exc).__name__}: <unprintable>"
    # Lone surrogates cannot be sent to Redis (nor logged as JSON): escape them.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[-MAX_ERROR_TEXT:]


def failure_of(claimed: Claimed, task: TaskDef, exc: BaseException) -> Failure:
    permanent = isinstance(exc, (PermanentError, *task.permanent))
    backoff: dict[str, Any] = {}
    if task.backoff is not None:
        backoff = {
            "backoff_base_ms": round(task.backoff.base * 1000),
            "backoff_cap_ms": round(task.backoff.cap * 1000),
        }
    return Failure(
        claimed.id,
        claimed.token,
        "permanent_error" if permanent else "error",
        describe(exc),
        permanent=permanent,
        **backoff,
    )
