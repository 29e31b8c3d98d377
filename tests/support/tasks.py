"""Handlers the tests run in real worker processes.

Every execution is appended to a ledger that is not Conveyor's own bookkeeping: a list in
another Redis database (index 15), named by ``CONVEYOR_TEST_LEDGER``. Tests count executions
from it (cases.md, "Ledger"). ``CONVEYOR_TEST_LEDGER_URL`` points the ledger at a Redis other
than the worker's own, so a test that breaks the worker's connection keeps its ledger.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from conveyor.errors import PermanentError, RetryableError
from conveyor.job import Job
from conveyor.registry import task

LEDGER_DB = 15
_ledger: redis.Redis | None = None


def _client() -> redis.Redis:
    global _ledger  # noqa: PLW0603 - one connection per worker process
    if _ledger is None:
        url = os.environ.get("CONVEYOR_TEST_LEDGER_URL") or os.environ["REDIS_URL"]
        _ledger = redis.Redis.from_url(url.rsplit("/", 1)[0] + f"/{LEDGER_DB}")
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
    # Ids a foreign client wrote in another encoding come back with surrogate escapes.
    entry["job_id"] = job.id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    _client().rpush(os.environ["CONVEYOR_TEST_LEDGER"], orjson.dumps(entry))


def read_ledger(client: redis.Redis, name: str) -> list[dict[str, Any]]:
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("db") == LEDGER_DB:
        return [orjson.loads(e) for e in client.lrange(name, 0, -1)]
    # Only the address and credentials carry over: redis-py keeps internal entries in
    # connection_kwargs that Redis() does not accept.
    wanted = ("host", "port", "username", "password", "unix_socket_path")
    source = redis.Redis(**{k: kwargs[k] for k in wanted if k in kwargs}, db=LEDGER_DB)
    try:
        return [orjson.loads(e) for e in source.lrange(name, 0, -1)]
    finally:
        source.close()


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


@task("drainable")
async def drainable(job: Job) -> None:
    """Sleeps ``seconds`` (``later_seconds`` once the ledger holds an earlier run) and records
    the message of the cancellation that stops it, so tests can tell timeout from shutdown."""
    start = time.time()
    earlier = any(row["job_id"] == job.id for row in _rows())
    record(job, "started", start)
    seconds = job.payload.get("later_seconds", 0.1) if earlier else job.payload["seconds"]
    try:
        await asyncio.sleep(float(seconds))
    except asyncio.CancelledError as exc:
        record(job, "cancelled", start, reason=str(exc.args[0]) if exc.args else "")
        raise
    record(job, "ok", start)


@task("gated")
def gated(job: Job) -> None:
    """Records success, then returns only once the file named ``gate`` exists: the test
    breaks the worker's connection between the handler's end and its ack."""
    record(job, "ok", time.time())
    gate = Path(job.payload["gate"])
    while not gate.exists():
        time.sleep(0.01)


@task("gil_hold")
def gil_hold(job: Job) -> None:
    """Keeps every other thread of the worker process (its event loop too) off the GIL for
    ``seconds``: the regex engine never releases the GIL, and the raised switch interval stops
    the interpreter from handing it over between two matches. With ``first_only`` later
    attempts return at once."""
    start = time.time()
    record(job, "started", start)
    if job.payload.get("first_only") and job.attempt > 1:
        record(job, "ok", start, held=0.0)
        return
    seconds = float(job.payload["seconds"])
    pattern = re.compile(r"(a+)+$")
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds + 5)
    try:
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            pattern.match("a" * 16 + "b")
        held = time.monotonic() - began
    finally:
        sys.setswitchinterval(previous)
    record(job, "ok", start, held=held)


@task("runaway")
def runaway(job: Job) -> None:
    """Ignores its timeout: a non-daemon thread touches ``touch`` forever, a child process
    sleeps, and the handler joins the thread."""
    start = time.time()
    touch = Path(job.payload["touch"])

    def toucher() -> None:
        while True:
            touch.touch()
            time.sleep(0.1)

    thread = threading.Thread(target=toucher, name="toucher", daemon=False)
    thread.start()
    child = subprocess.Popen(["sleep", "1000"])
    record(job, "started", start, child_pid=child.pid)
    thread.join()


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception has no text")

    def __repr__(self) -> str:
        raise RuntimeError("this exception has no repr either")


@task("bad_exception")
async def bad_exception(job: Job) -> None:
    """Raises an exception whose text cannot be produced (``unprintable``) or cannot be
    encoded as UTF-8 (``unencodable``: a lone surrogate)."""
    record(job, "error", time.time())
    if job.payload["kind"] == "unprintable":
        raise Unprintable(object())
    raise ValueError("lone surrogate \ud800 in the message")


@task("mutate_and_fail")
async def mutate_and_fail(job: Job) -> None:
    """Records the payload it was given, then mutates it into something JSON cannot hold and
    fails: a retry must still see the original payload."""
    record(job, "error", time.time(), payload=orjson.loads(orjson.dumps(job.payload)))
    job.payload["n"] = -1
    job.payload["handle"] = object()
    job.payload.setdefault("items", []).append(object())
    raise RetryableError("failing after mutating my payload")


@task("soak_noop")
async def soak_noop(job: Job) -> None:
    """No ledger: the memory soak measures the worker, not the test's bookkeeping."""


@task("soak_fail")
async def soak_fail(job: Job) -> None:
    """Fails with a deep traceback and a large message."""
    _recurse(40, "x" * 20_000)


def _recurse(depth: int, message: str) -> None:
    if depth == 0:
        raise RuntimeError(message)
    _recurse(depth - 1, message)


def _rows() -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in _client().lrange(os.environ["CONVEYOR_TEST_LEDGER"], 0, -1)]


@task("storm")
async def storm(job: Job) -> None:
    """The storm tests' mixed job, by ``kind``: ``ok`` sleeps ``seconds`` (0: none) and
    succeeds; ``fail_once`` fails its attempt 1; ``always_fail`` fails every attempt;
    ``permanent`` raises ``PermanentError``. Every run records ``started`` first, so a run cut
    off by a kill or a drain still shows in the ledger, and a drain's cancellation is recorded
    with its message."""
    start = time.time()
    record(job, "started", start)
    kind = job.payload["kind"]
    try:
        if seconds := float(job.payload.get("seconds", 0)):
            await asyncio.sleep(seconds)
    except asyncio.CancelledError as exc:
        record(job, "cancelled", start, reason=str(exc.args[0]) if exc.args else "")
        raise
    if kind == "permanent":
        record(job, "permanent", start)
        raise PermanentError("this job can never succeed")
    if kind == "always_fail" or (kind == "fail_once" and job.attempt == 1):
        record(job, "error", start)
        raise RuntimeError(f"failing attempt {job.attempt}")
    record(job, "ok", start)
