"""Jobs as producers describe them and as handlers receive them.

A job's payload is JSON, encoded once by the producer and stored as those exact bytes, so a
replayed dead letter carries a byte-identical payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from conveyor.errors import InvalidJob, PayloadTooLarge
from conveyor.keys import PRIORITY_CLASSES

DEFAULT_PRIORITY = "normal"
DEFAULT_MAX_PAYLOAD = 512 * 1024
SCHEMA_VERSION = "1"
_MAX_NAME = 200
MAX_SECONDS = 100 * 365 * 24 * 3600
"""Longest timeout, delay, deduplication window or backoff: a century. Larger values would
reach Lua as milliseconds beyond what its numbers and Redis's expiry times represent exactly
(a delay of 1e300 s came due at once, a window of 1e300 s failed inside enqueue.lua)."""
MAX_ATTEMPTS = 1_000_000


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between attempts: ``min(cap, base * 2**(attempt-1))``.

    With ``jitter`` (the default) the wait is drawn uniformly from zero to that bound ("full
    jitter"), which spreads out retries of jobs that failed together.
    """

    base: float = 1.0
    """Seconds before the first retry (upper bound with jitter)."""
    cap: float = 3600.0
    """Longest wait between two attempts, in seconds."""
    jitter: bool = True

    def __post_init__(self) -> None:
        _check_number("backoff base", self.base, minimum=0)
        _check_number("backoff cap", self.cap, minimum=0)
        if self.cap < self.base:
            raise InvalidJob(f"backoff needs 0 <= base <= cap, got base={self.base} cap={self.cap}")


@dataclass(frozen=True)
class JobSpec:
    """Everything a producer says about a job; validated on construction."""

    type: str
    payload: Any = field(default_factory=dict)
    priority: str = DEFAULT_PRIORITY
    group: str = ""
    """Tenant or other fairness key; groups take turns and can be rate limited or paused."""
    max_attempts: int = 3
    timeout: float = 300.0
    """Seconds one attempt may run before it is stopped and counted as failed."""
    delay: float = 0.0
    """Seconds from now (Redis time) before the job may run."""
    run_at: datetime | None = None
    """Absolute time (timezone-aware) before which the job may not run; excludes ``delay``."""
    dedup_key: str = ""
    dedup_window: float = 3600.0
    """Seconds during which another job with the same ``dedup_key`` is refused."""
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        _check_name("type", self.type, required=True)
        _check_name("group", self.group)
        _check_name("dedup_key", self.dedup_key)
        if not isinstance(self.priority, str) or self.priority not in PRIORITY_CLASSES:
            raise InvalidJob(
                f"priority must be one of {', '.join(PRIORITY_CLASSES)}, got {self.priority!r}"
            )
        _check_number(
            "max_attempts", self.max_attempts, minimum=1, maximum=MAX_ATTEMPTS, integer=True
        )
        _check_number("timeout", self.timeout, minimum=0.001)
        _check_number("delay", self.delay, minimum=0)
        _check_number("dedup_window", self.dedup_window, minimum=0.001)
        if self.run_at is not None:
            if not isinstance(self.run_at, datetime):
                raise InvalidJob(f"run_at must be a datetime, got {self.run_at!r:.40}")
            if self.delay:
                raise InvalidJob("give either delay or run_at, not both")
            if self.run_at.tzinfo is None:
                raise InvalidJob("run_at must be timezone-aware")

    def template(self) -> tuple[str | int, ...]:
        """The 13-field spec enqueue.lua shares across a run of jobs (payload and dedup key
        travel per job, so their slots are left empty). Kept once computed: a bulk enqueue
        copies one spec's fields, this one included, into every job it sends."""
        cached: tuple[str | int, ...] | None = self.__dict__.get("_template")
        if cached is None:
            cached = self._template_fields()
            object.__setattr__(self, "_template", cached)
        return cached

    def _template_fields(self) -> tuple[str | int, ...]:
        run_at_ms = 0 if self.run_at is None else max(1, int(self.run_at.timestamp() * 1000))
        return (
            self.type,
            "",
            self.priority,
            self.group,
            self.max_attempts,
            _ms(self.timeout),
            _ms(self.delay),
            run_at_ms,
            "",
            _ms(self.dedup_window),
            _ms(self.backoff.base),
            _ms(self.backoff.cap),
            1 if self.backoff.jitter else 0,
        )

    def encoded_payload(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
        return encode_payload(self.payload, max_payload)


def encode_payload(payload: Any, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    try:
        encoded = orjson.dumps(payload)
    except TypeError as exc:
        raise InvalidJob(f"payload is not JSON-serialisable: {exc}") from exc
    if len(encoded) > max_payload:
        raise PayloadTooLarge(len(encoded), max_payload)
    return encoded


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _check_name(what: str, value: object, *, required: bool = False) -> None:
    if not isinstance(value, str):
        raise InvalidJob(f"{what} must be a string, got {type(value).__name__}")
    if required and not value:
        raise InvalidJob(f"{what} must not be empty")
    if len(value) > _MAX_NAME or any(c in value for c in "\n\r\0"):
        raise InvalidJob(f"{what} must be at most {_MAX_NAME} characters on one line")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise InvalidJob(f"{what} is not valid UTF-8 text: {exc.reason}") from exc


def _check_number(
    what: str,
    value: object,
    *,
    minimum: float,
    maximum: float = MAX_SECONDS,
    integer: bool = False,
) -> None:
    valid_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, valid_type):
        kind = "an integer" if integer else "a number"
        raise InvalidJob(f"{what} must be {kind}, got {value!r:.40}")
    # Compared as given: a huge int never goes through float(), which would overflow.
    if not (minimum <= value <= maximum):
        raise InvalidJob(f"{what} must be between {minimum} and {maximum:g}, got {value!r:.40}")


@dataclass(frozen=True, slots=True)
class Job:
    """A leased job as a handler receives it."""

    id: str
    type: str
    payload: Any
    priority: str
    group: str
    attempt: int
    """This run's attempt number, starting at 1; a drained run is refunded, not counted."""
    max_attempts: int
    timeout: float
    created_at: float
    """Unix seconds (Redis time) at enqueue."""
    queued_at: float
    """Unix seconds (Redis time) at which it last became ready: wait time starts here."""
    lease_token: str
    lease_deadline: float


@dataclass(frozen=True)
class JobInfo:
    """A job's current record in Redis, for ``Queue.get_job`` and the dead-letter views."""

    id: str
    state: str
    """``queued``, ``delayed``, ``active``, ``done`` (kept by retention) or ``dead``."""
    type: str
    priority: str
    group: str
    payload: bytes
    attempts: int
    max_attempts: int
    created_at: float
    dedup_key: str
    replay_count: int
    dead_reason: str
    dead_at: float | None
    run_at: float | None
    errors: list[dict[str, Any]]

    @classmethod
    def from_redis(cls, job_id: str, raw: Mapping[bytes, bytes], errors: list[bytes]) -> JobInfo:
        def text(name: str, default: str = "") -> str:
            value = raw.get(name.encode())
            return default if value is None else value.decode(errors="replace")

        # A record written by a foreign client may hold anything: an unreadable number shows
        # as absent (or its default) rather than making the record impossible to inspect.
        def integer(name: str) -> int | None:
            try:
                return int(raw[name.encode()])
            except (KeyError, ValueError):
                return None

        def number(name: str) -> float | None:
            value = integer(name)
            return None if value is None else value / 1000

        history: list[dict[str, Any]] = []
        for entry in errors:
            try:
                history.append(orjson.loads(entry))
            except orjson.JSONDecodeError:
                history.append({"error": entry.decode(errors="replace")})
        return cls(
            id=job_id,
            state=text("s", "unknown"),
            type=text("t"),
            priority=text("c"),
            group=text("g"),
            payload=raw.get(b"p", b""),
            attempts=integer("a") or 0,
            max_attempts=integer("m") or 3,
            created_at=number("ct") or 0.0,
            dedup_key=text("dk"),
            replay_count=integer("rc") or 0,
            dead_reason=text("dr"),
            dead_at=number("dt"),
            run_at=number("ra"),
            errors=history,
        )
