"""The worker's side of the lease protocol: claim, extend, ack, fail, hand back, recover.

Each call is one Lua script and works on a batch, so a busy worker pays one round trip for
many jobs while every guarantee (fencing token, attempt count, event) still holds per job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from conveyor import scripts
from conveyor.errors import BackendUnavailable, translate_redis_error
from conveyor.keys import Keyspace


@dataclass(frozen=True, slots=True)
class Claimed:
    """A leased job exactly as Redis holds it; decoding is the worker's business."""

    id: str
    token: str
    priority: str
    type: str | None
    payload: bytes | None
    attempt: int
    max_attempts: int
    timeout_ms: int
    group: str
    created_ms: int | None
    queued_ms: int | None
    version: str | None
    lease_deadline_ms: int
    alone: bool = False
    """The job's last run died with its worker process: run it with no other job beside it."""
    malformed: str = ""
    """Why the record cannot run as written (a field the worker cannot read); empty if none."""


@dataclass(frozen=True, slots=True)
class ClaimResult:
    now_ms: int
    next_ms: int
    """When more work may become claimable (ms, Redis time); -1 if nothing is scheduled."""
    jobs: list[Claimed]
    stale_acks: list[str] = field(default_factory=list)
    """Ids of the acks sent along with the claim whose lease had been lost."""
    problem: str = ""
    """The error that stopped the claim early (a key of another type under one of the queue's
    names); the acks and the jobs above were recorded all the same."""


Ack = tuple[str, str, int]
"""A successful attempt to report: job id, lease token, runtime in ms."""


@dataclass(frozen=True, slots=True)
class Failure:
    job_id: str
    token: str
    reason: str
    """A short machine word: error, timeout, decode_error, unknown_job_type, ..."""
    message: str
    permanent: bool = False
    backoff_base_ms: int = -1
    backoff_cap_ms: int = -1


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode(errors="replace")


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _positive(value: bytes, what: str, problems: list[str], default: int) -> int:
    """A count or duration as enqueue.lua stores it: decimal digits, at least 1, exact in Lua."""
    if value.isdigit() and len(value) <= 15 and int(value) >= 1:
        return int(value)
    problems.append(f"{what} is {value[:40]!r}, not a positive integer")
    return default


def _wire(job_id: str) -> bytes:
    """A job id as Redis holds it: ids come back from Redis decoded with surrogateescape, so
    one a foreign client wrote in another encoding still names its own record."""
    return job_id.encode("utf-8", "surrogateescape")


def _parse_claim(raw: list[Any]) -> ClaimResult:
    return ClaimResult(
        int(raw[0]),
        int(raw[1]),
        [_parse_claimed(r) for r in raw[4:]],
        [i.decode("utf-8", "surrogateescape") for i in raw[2]],
        raw[3].decode(errors="replace"),
    )


def _claim_args(
    n: int, lease_ttl_ms: int, token_prefix: str, classes: tuple[str, ...], acks: list[Ack]
) -> list[Any]:
    args: list[Any] = [n, lease_ttl_ms, token_prefix, len(classes), *classes]
    for job_id, token, runtime_ms in acks:
        args += (_wire(job_id), token, runtime_ms)
    return args


def _parse_claimed(row: list[Any]) -> Claimed:
    # Every field but the id, token and class (claim.lua writes those) may come from a foreign
    # client: nothing here may raise, or one bad record would stop this worker's claiming.
    problems: list[str] = []
    return Claimed(
        id=row[0].decode("utf-8", "surrogateescape"),
        token=row[1].decode(),
        priority=row[2].decode(),
        type=_text(row[3]),
        payload=row[4],
        attempt=int(row[5]),
        max_attempts=_positive(row[6], "max attempts (m)", problems, 1),
        timeout_ms=_positive(row[7], "timeout (o)", problems, 300_000),
        group=row[8].decode(errors="replace"),
        created_ms=_int(row[9]),
        queued_ms=_int(row[10]),
        version=_text(row[11]),
        lease_deadline_ms=int(row[12]),
        alone=row[13] == 1,
        malformed="; ".join(problems),
    )


class LeaseClient:
    """Async wrappers of the worker-side scripts for one queue."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keyspace) -> None:
        self.client = client
        self.keys = keys
        # Encoded once: redis-py would otherwise encode all the key names on every call.
        self._script_keys = [k.encode() for k in keys.script_keys]

    async def _run(self, script: scripts.LuaScript, args: list[Any]) -> Any:
        return await script.arun(self.client, self._script_keys, args)

    async def claim(
        self,
        n: int,
        lease_ttl_ms: int,
        token_prefix: str,
        classes: tuple[str, ...],
        acks: list[Ack] | None = None,
    ) -> ClaimResult:
        """Lease up to ``n`` jobs; ``acks`` are recorded first, in the same script call
        (their lost leases come back in ``ClaimResult.stale_acks``)."""
        args = _claim_args(n, lease_ttl_ms, token_prefix, classes, acks or [])
        return _parse_claim(await self._run(scripts.CLAIM, args))

    async def wait_then_claim(
        self,
        blocking: redis.asyncio.Redis,
        wake_keys: list[str],
        wait_seconds: float,
        claim: tuple[int, int, str, tuple[str, ...]],
        waiting_as: Callable[[int | None], None],
    ) -> ClaimResult | None:
        """Block on the wake-up lists, then claim, in one round trip: Redis runs the claim
        (``claim``: the arguments of ``claim()``) the moment the wait ends, on a wake-up token
        or after ``wait_seconds``, so an idle worker's pickup costs one trip instead of two.

        ``waiting_as`` gets the Redis client id of the waiting connection (then None once
        the wait is over): ``CLIENT UNBLOCK`` with it ends the wait early. Returns None if
        Redis had lost Conveyor's functions (the next plain ``claim()`` loads them again)."""
        n, lease_ttl_ms, token_prefix, classes = claim
        pool = blocking.connection_pool
        try:
            # redis-py connects here, so an outage shows up here first.
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py
        except redis.exceptions.RedisError as exc:
            raise translate_redis_error(exc, "claim") from exc
        except OSError as exc:
            raise BackendUnavailable(f"Redis unreachable during claim: {exc}") from exc
        # Every reply is read, error replies included: Redis runs the claim whatever became
        # of the two commands before it, and a claim whose reply went unread would leave its
        # jobs leased to nobody until their leases expired.
        replies: list[Any] = []
        try:
            await connection.send_packed_command(
                connection.pack_commands(
                    [
                        ("CLIENT", "ID"),
                        ("BLPOP", *wake_keys, wait_seconds),
                        (
                            "FCALL",
                            scripts.CLAIM.function,
                            len(self._script_keys),
                            *self._script_keys,
                            *_claim_args(n, lease_ttl_ms, token_prefix, classes, []),
                        ),
                    ]
                )
            )
            while len(replies) < 3:
                try:
                    replies.append(await connection.read_response())
                except redis.exceptions.ResponseError as exc:  # the connection is still in step
                    replies.append(exc)
                if len(replies) == 1:
                    waiting_as(replies[0] if isinstance(replies[0], int) else None)
                elif len(replies) == 2:
                    waiting_as(None)
        except BaseException as exc:
            waiting_as(None)
            # Unread replies would be taken for the answers to the next commands.
            await connection.disconnect()
            if isinstance(exc, redis.exceptions.RedisError):
                raise translate_redis_error(exc, "claim") from exc
            if isinstance(exc, OSError):
                raise BackendUnavailable(f"Redis unreachable during claim: {exc}") from exc
            raise
        finally:
            await pool.release(connection)
        _, woken, raw = replies
        if scripts.missing(raw):
            return None
        if isinstance(raw, redis.exceptions.ResponseError):
            raise translate_redis_error(raw, "claim") from raw
        result = _parse_claim(raw)
        if isinstance(woken, redis.exceptions.ResponseError) and not result.jobs:
            # The wait itself fails (a wake-up key of the wrong type, say): the caller backs
            # off instead of spinning on an error that returns at once.
            raise translate_redis_error(woken, "wait for work") from woken
        return result

    async def ack(self, done: list[Ack]) -> list[str]:
        """Acknowledge (id, token, runtime ms) triples; returns ids whose lease was lost."""
        args: list[Any] = []
        for job_id, token, runtime_ms in done:
            args += (_wire(job_id), token, runtime_ms)
        return [i.decode("utf-8", "surrogateescape") for i in await self._run(scripts.ACK, args)]

    async def fail(self, failures: list[Failure]) -> list[tuple[str, str, int]]:
        """Record failures; returns (id, 'retry' | 'dead' | 'stale', delay ms) per job."""
        args: list[Any] = []
        for f in failures:
            args += (
                _wire(f.job_id),
                f.token,
                f.reason,
                f.message,
                int(f.permanent),
                f.backoff_base_ms,
                f.backoff_cap_ms,
            )
        raw = await self._run(scripts.FAIL, args)
        return [(r[0].decode("utf-8", "surrogateescape"), r[1].decode(), int(r[2])) for r in raw]

    async def extend(self, leases: list[tuple[str, str]], lease_ttl_ms: int) -> list[str]:
        """Push the deadline of (id, token) leases forward; returns the ids already lost."""
        args: list[Any] = [lease_ttl_ms]
        for job_id, token in leases:
            args += (_wire(job_id), token)
        raw = await self._run(scripts.EXTEND, args)
        return [i.decode("utf-8", "surrogateescape") for i in raw[1:]]

    async def hand_back(self, leases: list[tuple[str, str]]) -> list[str]:
        args: list[Any] = []
        for job_id, token in leases:
            args += (_wire(job_id), token)
        return [
            i.decode("utf-8", "surrogateescape") for i in await self._run(scripts.HANDBACK, args)
        ]

    async def recover(self, classes: tuple[str, ...], limit: int = 100) -> tuple[int, int]:
        """Recover expired leases and promote due delayed jobs; (recovered, promoted)."""
        raw = await self._run(scripts.RECOVER, [limit, *classes])
        return int(raw[0]), int(raw[1])
