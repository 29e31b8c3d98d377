"""Reading a TaskQueue's backlog from Redis, and keeping its delayed work moving.

Each poll also runs Conveyor's recovery script, which promotes due delayed jobs and retries and
recovers expired leases: a class scaled to zero has no worker to do that, and its due work
would otherwise never show up as ready.

A failure is classified (connection refused, authentication, timeout, ...) so the TaskQueue's
``RedisReachable`` condition says what is wrong; the scaler holds replicas on any failure.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from typing import cast

import redis.asyncio
import redis.exceptions

from conveyor import scripts
from conveyor.connection import connect_async
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.queue import ClassStats, parse_stats

PROBE_TIMEOUT = 3.0


class BacklogUnavailable(Exception):
    """The backlog could not be read; ``reason`` is a CamelCase word for conditions/events."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RedisTarget:
    url: str
    password: str | None
    tls: bool
    queue: str


def _classify(exc: BaseException) -> BacklogUnavailable:
    text = str(exc)
    if isinstance(exc, redis.exceptions.AuthenticationError) or any(
        word in text for word in ("NOAUTH", "WRONGPASS", "invalid password", "invalid username")
    ):
        return BacklogUnavailable("AuthFailed", f"Redis refused the credentials: {text}")
    if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
        return BacklogUnavailable("Timeout", f"Redis did not answer within {PROBE_TIMEOUT}s")
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return BacklogUnavailable("Loading", "Redis is loading its dataset")
    if isinstance(exc, redis.exceptions.ConnectionError):
        if _refused(exc) or "refused" in text.lower():
            return BacklogUnavailable("ConnectionRefused", f"Redis refused the connection: {text}")
        return BacklogUnavailable("ConnectionFailed", f"cannot reach Redis: {text}")
    return BacklogUnavailable("RedisError", f"Redis answered with an error: {text}")


def _refused(exc: BaseException) -> bool:
    """Whether a connection error comes from ECONNREFUSED: redis-py's message only says
    ``Error 111``, so the reason is found on the chained OS error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or getattr(seen, "errno", None) == (
            errno.ECONNREFUSED
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class BacklogReader:
    """Keeps one small connection pool per Redis target across polls."""

    def __init__(self) -> None:
        self._clients: dict[RedisTarget, redis.asyncio.Redis] = {}

    def client(self, target: RedisTarget) -> redis.asyncio.Redis:
        client = self._clients.get(target)
        if client is None:
            url = target.url
            if target.tls and url.startswith(("redis://", "redis+sentinel://")):
                url = "rediss" + url.removeprefix("redis")
            client = connect_async(
                url,
                password=target.password,
                socket_timeout=PROBE_TIMEOUT,
                socket_connect_timeout=PROBE_TIMEOUT,
                max_connections=4,
            )
            self._clients[target] = client
        return client

    async def read(self, target: RedisTarget) -> dict[str, ClassStats]:
        client = self.client(target)
        keys = Keyspace(target.queue).script_keys
        try:
            async with asyncio.timeout(PROBE_TIMEOUT * 2):
                await scripts.RECOVER.arun(client, keys, [1000, *PRIORITY_CLASSES])
                raw = await scripts.STATS.arun(client, keys, list(PRIORITY_CLASSES))
        except Exception as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            # A broken connection must not be reused on the next poll.
            await self.forget(target)
            raise _classify(cause) from exc
        return {row.priority: row for row in parse_stats(raw)}

    async def started(self, target: RedisTarget) -> dict[str, int]:
        """Jobs started per class since the queue was created (a counter the claim script
        keeps): what ran between two polls, which no poll may have caught in flight."""
        client = self.client(target)
        fields = [f"started:{p}" for p in PRIORITY_CLASSES]
        try:
            async with asyncio.timeout(PROBE_TIMEOUT * 2):
                raw = await client.hmget(Keyspace(target.queue).counts, fields)
        except Exception as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            await self.forget(target)
            raise _classify(cause) from exc
        return {p: int(v or 0) for p, v in zip(PRIORITY_CLASSES, raw, strict=True)}

    async def forget(self, target: RedisTarget) -> None:
        client = self._clients.pop(target, None)
        if client is not None:
            await client.aclose()

    async def workers(self, target: RedisTarget) -> dict[str, tuple[int, str]]:
        """Pod name → (busy slots, oldest running job id) from live worker heartbeats."""
        client = self.client(target)
        keys = Keyspace(target.queue)
        ids = [i.decode() for i in cast(list[bytes], await client.zrange(keys.workers, 0, -1))]
        pods: dict[str, tuple[int, str]] = {}
        if not ids:
            return pods
        async with client.pipeline(transaction=False) as pipe:
            for identity in ids:
                pipe.hmget(keys.worker(identity), "pod", "busy", "jobs")
            rows = await pipe.execute()
        for pod, busy, jobs in rows:
            if not pod:
                continue
            name = pod.decode()
            previous = pods.get(name, (0, ""))
            job_ids = (jobs or b"").decode().split(",")
            oldest = min([j for j in job_ids if j] or [previous[1] or ""])
            pods[name] = (previous[0] + int(busy or 0), oldest)
        return pods

    async def close(self) -> None:
        for target in list(self._clients):
            await self.forget(target)
