"""Conveyor's exceptions, all rooted at ``ConveyorError``.

ConveyorError
├── ConfigError              settings or arguments that cannot work
├── InvalidJob               a job refused at enqueue; nothing was stored
│   └── PayloadTooLarge
├── JobNotFound
├── BackendError             Redis or PostgreSQL failed (the cause is chained)
│   └── BackendUnavailable   connection refused, lost or timed out: worth retrying
└── HandlerError             raised by handlers to steer what happens to their job
    ├── RetryableError       try again after the backoff (any other exception does too)
    ├── PermanentError       dead-letter at once, whatever attempts remain
    └── JobTimeout           the job ran past its timeout (raised inside the handler)
"""

from __future__ import annotations

import redis.exceptions


class ConveyorError(Exception):
    """Root of every error Conveyor raises."""


class ConfigError(ConveyorError):
    """A setting or argument that cannot work."""


class InvalidJob(ConveyorError, ValueError):
    """A job that was refused at enqueue; nothing was stored."""


class PayloadTooLarge(InvalidJob):
    """The encoded payload is over the queue's size limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload is {size} bytes, over the {limit}-byte limit")
        self.size = size
        self.limit = limit


class JobNotFound(ConveyorError, LookupError):
    """No job with that id exists (any more) in Redis."""


class BackendError(ConveyorError):
    """Redis or PostgreSQL answered with an error."""


class BackendUnavailable(BackendError):
    """Redis or PostgreSQL could not be reached; the operation may be retried."""


class HandlerError(ConveyorError):
    """Raised by a job handler to say how its failure should be treated."""


class RetryableError(HandlerError):
    """A transient failure: retry after the backoff while attempts remain."""


class PermanentError(HandlerError):
    """A failure no retry can fix: the job goes straight to the dead-letter queue."""


class JobTimeout(HandlerError):
    """The job exceeded its timeout; distinct from cancellation by a worker shutdown."""


def translate_redis_error(exc: redis.exceptions.RedisError, operation: str) -> BackendError:
    """Map a redis-py error onto Conveyor's tree; callers chain ``exc`` as the cause."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return BackendUnavailable(f"Redis unreachable during {operation}: {exc}")
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return BackendUnavailable(f"Redis is loading its dataset during {operation}")
    if isinstance(exc, redis.exceptions.ReadOnlyError) or any(
        code in str(exc) for code in _FAILOVER_CODES
    ):
        # A primary that was demoted, or that has too few replicas to accept writes: the
        # state of a failover in progress, which retrying (on the new primary) gets past.
        return BackendUnavailable(f"Redis refused {operation} during a failover: {exc}")
    return BackendError(f"Redis error during {operation}: {exc}")


_FAILOVER_CODES = ("READONLY", "NOREPLICAS", "MASTERDOWN")
