"""The handlers' own record of every attempt they finished, kept apart from Conveyor's books.

The demo must show that no job was lost without trusting the queue's bookkeeping to say so, so
each handler appends one entry per attempt (success or error) to a Redis list that no Conveyor
script touches, before it returns. A job counts as completed only when such an entry says it
ran to the end. The entry also carries the job's queued and start times: the queue waits of the
report come from here.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from conveyor.job import Job

READ_CHUNK = 10_000


@dataclass(frozen=True)
class LedgerKeys:
    run: str

    @property
    def entries(self) -> str:
        """List: one JSON entry per finished attempt."""
        return f"conveyor-demo:{{{self.run}}}:ledger"

    @property
    def done(self) -> str:
        """Hash: completed attempts per priority class, for the live progress display."""
        return f"conveyor-demo:{{{self.run}}}:done"


@dataclass(frozen=True, slots=True)
class Entry:
    job_id: str
    type: str
    priority: str
    group: str
    attempt: int
    queued_at: float
    started_at: float
    ended_at: float
    ok: bool
    pid: int
    detail: dict[str, Any]

    @property
    def wait(self) -> float:
        """Seconds from becoming ready to the handler starting: the queue wait."""
        return max(0.0, self.started_at - self.queued_at)

    @property
    def runtime(self) -> float:
        return max(0.0, self.ended_at - self.started_at)


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10)


def record(
    url: str, keys: LedgerKeys, job: Job, started_at: float, ok: bool, **detail: Any
) -> None:
    """Append one finished attempt; called by the handler before it returns or raises."""
    entry = {
        "id": job.id,
        "t": job.type,
        "c": job.priority,
        "g": job.group,
        "a": job.attempt,
        "q": job.queued_at,
        "s": started_at,
        "e": time.time(),
        "ok": ok,
        "pid": os.getpid(),
        "d": detail,
    }
    pipe = _client(url).pipeline(transaction=False)
    pipe.rpush(keys.entries, orjson.dumps(entry))
    if ok:
        pipe.hincrby(keys.done, job.priority, 1)
    pipe.execute()


def read(client: redis.Redis, keys: LedgerKeys) -> Iterator[Entry]:
    start = 0
    while True:
        chunk: list[bytes] = client.lrange(keys.entries, start, start + READ_CHUNK - 1)  # type: ignore[assignment]
        for raw in chunk:
            e = orjson.loads(raw)
            yield Entry(
                e["id"],
                e["t"],
                e["c"],
                e["g"],
                e["a"],
                e["q"],
                e["s"],
                e["e"],
                e["ok"],
                e["pid"],
                e["d"],
            )
        if len(chunk) < READ_CHUNK:
            return
        start += READ_CHUNK


def completed_per_class(client: redis.Redis, keys: LedgerKeys) -> dict[str, int]:
    raw: dict[bytes, bytes] = client.hgetall(keys.done)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}
