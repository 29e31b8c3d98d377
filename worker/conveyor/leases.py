"""The worker's side of the lease protocol: claim, extend, ack, fail, hand back, recover.

Each call is one Lua script and works on a batch, so a busy worker pays one round trip for
many jobs while every guarantee (fencing token, attempt count, event) still holds per job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio

from conveyor import scripts
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


@dataclass(frozen=True, slots=True)
class ClaimResult:
    now_ms: int
    next_ms: int
    """When more work may become claimable (ms, Redis time); -1 if nothing is scheduled."""
    jobs: list[Claimed]


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


def _parse_claimed(row: list[Any]) -> Claimed:
    return Claimed(
        id=row[0].decode(),
        token=row[1].decode(),
        priority=row[2].decode(),
        type=_text(row[3]),
        payload=row[4],
        attempt=int(row[5]),
        max_attempts=_int(row[6]) or 1,
        timeout_ms=_int(row[7]) or 300_000,
        group=row[8].decode(),
        created_ms=_int(row[9]),
        queued_ms=_int(row[10]),
        version=_text(row[11]),
        lease_deadline_ms=int(row[12]),
    )


class LeaseClient:
    """Async wrappers of the worker-side scripts for one queue."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keyspace) -> None:
        self.client = client
        self.keys = keys
        self._script_keys = keys.script_keys

    async def _run(self, script: scripts.LuaScript, args: list[Any]) -> Any:
        return await script.arun(self.client, self._script_keys, args)

    async def claim(
        self, n: int, lease_ttl_ms: int, token_prefix: str, classes: tuple[str, ...]
    ) -> ClaimResult:
        raw = await self._run(scripts.CLAIM, [n, lease_ttl_ms, token_prefix, *classes])
        return ClaimResult(int(raw[0]), int(raw[1]), [_parse_claimed(r) for r in raw[2:]])

    async def ack(self, done: list[tuple[str, str, int]]) -> list[str]:
        """Acknowledge (id, token, runtime ms) triples; returns ids whose lease was lost."""
        args: list[Any] = []
        for job_id, token, runtime_ms in done:
            args += (job_id, token, runtime_ms)
        return [i.decode() for i in await self._run(scripts.ACK, args)]

    async def fail(self, failures: list[Failure]) -> list[tuple[str, str, int]]:
        """Record failures; returns (id, 'retry' | 'dead' | 'stale', delay ms) per job."""
        args: list[Any] = []
        for f in failures:
            args += (
                f.job_id,
                f.token,
                f.reason,
                f.message,
                int(f.permanent),
                f.backoff_base_ms,
                f.backoff_cap_ms,
            )
        raw = await self._run(scripts.FAIL, args)
        return [(r[0].decode(), r[1].decode(), int(r[2])) for r in raw]

    async def extend(self, leases: list[tuple[str, str]], lease_ttl_ms: int) -> list[str]:
        """Push the deadline of (id, token) leases forward; returns the ids already lost."""
        args: list[Any] = [lease_ttl_ms]
        for job_id, token in leases:
            args += (job_id, token)
        raw = await self._run(scripts.EXTEND, args)
        return [i.decode() for i in raw[1:]]

    async def hand_back(self, leases: list[tuple[str, str]]) -> list[str]:
        args: list[Any] = []
        for job_id, token in leases:
            args += (job_id, token)
        return [i.decode() for i in await self._run(scripts.HANDBACK, args)]

    async def recover(self, classes: tuple[str, ...], limit: int = 100) -> tuple[int, int]:
        """Recover expired leases and promote due delayed jobs; (recovered, promoted)."""
        raw = await self._run(scripts.RECOVER, [limit, *classes])
        return int(raw[0]), int(raw[1])
