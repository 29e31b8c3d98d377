"""A worker without a worker: tests drive the lease protocol step by step.

``ScriptedWorker`` calls ``conveyor.leases.LeaseClient`` exactly as the worker does, but from
synchronous test code, one call at a time, so a test decides when a job is claimed, acked,
failed, handed back or left to expire. Each call runs on its own event loop and connection,
which keeps the tests free of loop fixtures; used as a context manager, the worker keeps one
loop and connection instead, for tests that make thousands of calls. ``together`` runs several
calls at the same instant on separate connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Self, TypeVar

import redis.asyncio

from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.leases import Claimed, ClaimResult, Failure, LeaseClient

T = TypeVar("T")


class ScriptedWorker:
    def __init__(
        self,
        url: str,
        keys: Keyspace,
        name: str = "w1",
        *,
        classes: tuple[str, ...] = PRIORITY_CLASSES,
        lease_ttl_ms: int = 10_000,
    ) -> None:
        self.url = url
        self.keys = keys
        self.name = name
        self.classes = classes
        self.lease_ttl_ms = lease_ttl_ms
        self.claims = 0
        self._session: tuple[asyncio.Runner, LeaseClient] | None = None

    def __enter__(self) -> Self:
        client = redis.asyncio.Redis.from_url(self.url)
        self._session = (asyncio.Runner(), LeaseClient(client, self.keys))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            runner, lease_client = self._session
            self._session = None
            try:
                runner.run(lease_client.client.aclose())
            finally:
                runner.close()

    def call(self, step: Callable[[LeaseClient], Awaitable[T]]) -> T:
        if self._session is not None:
            runner, lease_client = self._session
            return runner.run(_awaited(step(lease_client)))
        return self.together([step])[0]

    def together(self, steps: Iterable[Callable[[LeaseClient], Awaitable[T]]]) -> list[T]:
        """Run the steps concurrently, each on its own connection."""

        async def run_all() -> list[T]:
            clients = []
            try:
                calls = []
                for step in steps:
                    client = redis.asyncio.Redis.from_url(self.url)
                    clients.append(client)
                    calls.append(step(LeaseClient(client, self.keys)))
                return list(await asyncio.gather(*calls))
            finally:
                for client in clients:
                    await client.aclose()

        if self._session is not None:
            return self._session[0].run(run_all())
        return asyncio.run(run_all())

    def claim(
        self, n: int = 1, *, classes: tuple[str, ...] | None = None, lease_ttl_ms: int | None = None
    ) -> ClaimResult:
        self.claims += 1
        prefix = f"{self.name}/{self.claims}"
        ttl = self.lease_ttl_ms if lease_ttl_ms is None else lease_ttl_ms
        return self.call(lambda lc: lc.claim(n, ttl, prefix, classes or self.classes))

    def claim_ids(self, n: int = 1, *, classes: tuple[str, ...] | None = None) -> list[str]:
        return [job.id for job in self.claim(n, classes=classes).jobs]

    def ack(self, *jobs: Claimed, runtime_ms: int = 1) -> list[str]:
        """Acknowledge; returns the ids whose lease was stale."""
        return self.call(lambda lc: lc.ack([(j.id, j.token, runtime_ms) for j in jobs]))

    def fail(
        self,
        *jobs: Claimed,
        reason: str = "error",
        message: str = "boom",
        permanent: bool = False,
        backoff_base_ms: int = -1,
        backoff_cap_ms: int = -1,
    ) -> list[tuple[str, str, int]]:
        failures = [
            Failure(j.id, j.token, reason, message, permanent, backoff_base_ms, backoff_cap_ms)
            for j in jobs
        ]
        return self.call(lambda lc: lc.fail(failures))

    def extend(self, *jobs: Claimed, lease_ttl_ms: int | None = None) -> list[str]:
        ttl = self.lease_ttl_ms if lease_ttl_ms is None else lease_ttl_ms
        return self.call(lambda lc: lc.extend([(j.id, j.token) for j in jobs], ttl))

    def hand_back(self, *jobs: Claimed) -> list[str]:
        return self.call(lambda lc: lc.hand_back([(j.id, j.token) for j in jobs]))

    def recover(self, limit: int = 100) -> tuple[int, int]:
        return self.call(lambda lc: lc.recover(self.classes, limit))


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable
