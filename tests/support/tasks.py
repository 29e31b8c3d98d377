"""Handlers the tests run in real worker processes.

Every execution is appended to a ledger that is not Conveyor's own bookkeeping: a list in
another Redis database (index 15), named by ``CONVEYOR_TEST_LEDGER``. Tests count executions
from it (cases.md, "Ledger").
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import orjson
import redis

from conveyor.job import Job
from conveyor.registry import task

LEDGER_DB = 15
_ledger: redis.Redis | None = None


def _client() -> redis.Redis:
    global _ledger  # noqa: PLW0603 - one connection per worker process
    if _ledger is None:
        url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + f"/{LEDGER_DB}"
        _ledger = redis.Redis.from_url(url)
    return _ledger


def record(job: Job, outcome: str, t_start: float, **extra: Any) -> None:
    entry = {
        "job_id": job.id,
        "attempt": job.attempt,
        "pid": os.getpid(),
        "type": job.type,
        "t_start": t_start,
        "t_end": time.time(),
        "outcome": outcome,
        **extra,
    }
    _client().rpush(os.environ["CONVEYOR_TEST_LEDGER"], orjson.dumps(entry))


def read_ledger(client: redis.Redis, name: str) -> list[dict[str, Any]]:
    ledger = client.connection_pool.connection_kwargs.get("db") == LEDGER_DB
    source = (
        client
        if ledger
        else redis.Redis(**{**client.connection_pool.connection_kwargs, "db": LEDGER_DB})
    )
    return [orjson.loads(e) for e in source.lrange(name, 0, -1)]


@task("noop")
async def noop(job: Job) -> None:
    record(job, "ok", time.time())


@task("sleep")
async def sleep(job: Job) -> None:
    start = time.time()
    record(job, "started", start)
    await asyncio.sleep(float(job.payload.get("seconds", 1)))
    record(job, "ok", start)


@task("sync_sleep")
def sync_sleep(job: Job) -> None:
    start = time.time()
    time.sleep(float(job.payload.get("seconds", 1)))
    record(job, "ok", start)


@task("fail")
async def fail(job: Job) -> None:
    record(job, "error", time.time())
    raise RuntimeError(f"failing attempt {job.attempt}")


@task("fail_once")
async def fail_once(job: Job) -> None:
    if job.attempt == 1:
        record(job, "error", time.time())
        raise RuntimeError("first attempt fails")
    record(job, "ok", time.time())


@task("kill_self")
async def kill_self(job: Job) -> None:
    """Dies like an OOM kill, on every attempt or (payload "once") only the first."""
    if not job.payload.get("once") or job.attempt == 1:
        record(job, "killed", time.time())
        os.kill(os.getpid(), signal.SIGKILL)
    record(job, "ok", time.time())
