"""Shared side of the driver protocol for Python drivers (see bench/README.md).

A driver runs inside its system's own virtualenv, so this module depends only on the
standard library and redis-py, which every Python system under test already brings.

It provides three things:
- `main(driver)`: argument parsing, timing and the one-line JSON answer on stdout;
- `record_done()` / `ack_probe()`: what job handlers call, writing the shared measurements
  into Redis with the key layout the harness reads;
- `fan_out()`: run P copies of a single-process worker for systems without a supervisor.
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DONE_KEY = "bench:done"
ACK_KEY = "bench:ack"
LANES = ("normal", "low", "critical")
# How often a worker process publishes its completion count. Short enough that the harness
# sees the last job within a few tens of ms, long enough to cost nothing per job.
FLUSH_INTERVAL_S = 0.02
PROBE_ACK_TIMEOUT_S = 60

# One round trip folds a process's progress into the shared totals. `first` keeps the
# earliest start and `last` the latest finish across all processes, so throughput is
# measured from first pick-up to last completion whatever the number of workers.
RECORD_LUA = """
local n = redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])
local f = redis.call('HGET', KEYS[1], 'first')
if (not f) or tonumber(ARGV[2]) < tonumber(f) then redis.call('HSET', KEYS[1], 'first', ARGV[2]) end
local l = redis.call('HGET', KEYS[1], 'last')
if (not l) or tonumber(ARGV[3]) > tonumber(l) then redis.call('HSET', KEYS[1], 'last', ARGV[3]) end
return n
"""


class _Recorder:
    """Counts completed no-op jobs in memory and publishes them from a side thread.

    A per-job Redis round trip would add the same fixed cost to every system and so flatten
    the ratios between fast and slow ones; counting in memory keeps the handler almost free.
    State is rebuilt after fork, because prefork pools inherit a copy of the parent's, and
    rebuilt under a lock, because threaded workers make their first calls concurrently.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._init_lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)
        self._lock = threading.Lock()
        self._n = 0
        self._flushed = 0
        self._first = 0.0
        self._last = 0.0
        self._client: redis.Redis | None = None
        self._script: Any = None
        self._thread_started = False

    def _after_fork(self) -> None:
        # A lock held by another thread at fork time would stay held forever in the child.
        self._init_lock = threading.Lock()

    def _ensure(self) -> redis.Redis:
        pid = os.getpid()
        if pid != self._pid:
            with self._init_lock:
                if pid != self._pid:
                    self._lock = threading.Lock()
                    self._n = self._flushed = 0
                    self._first = self._last = 0.0
                    self._client = redis.Redis.from_url(REDIS_URL)
                    self._script = self._client.register_script(RECORD_LUA)
                    self._thread_started = False
                    # Published last: other threads skip initialisation only once it is whole.
                    self._pid = pid
        assert self._client is not None
        return self._client

    def done(self, sync: bool = False) -> None:
        now = time.time()
        self._ensure()
        if sync:
            # For workers that fork a child per job and leave it with os._exit(): a side
            # thread would die with the child before it ever flushed.
            self._script(keys=[DONE_KEY], args=[1, repr(now), repr(now)])
            return
        with self._lock:
            if self._n == 0:
                self._first = now
            self._n += 1
            self._last = now
            start_flusher = not self._thread_started
            self._thread_started = True
        if start_flusher:
            threading.Thread(target=self._flush_forever, name="bench-recorder", daemon=True).start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            with self._lock:
                delta = self._n - self._flushed
                first, last = self._first, self._last
                self._flushed = self._n
            if delta <= 0:
                continue
            try:
                self._script(keys=[DONE_KEY], args=[delta, repr(first), repr(last)])
            except redis.RedisError:
                with self._lock:
                    self._flushed -= delta  # sent again on the next tick

    def ack(self, seq: int) -> None:
        started = time.time()
        client = self._ensure()
        client.lpush(ACK_KEY, f"{seq} {started!r}")


_RECORDER = _Recorder()


def record_done(sync: bool = False) -> None:
    """Call from the no-op job handler."""
    _RECORDER.done(sync=sync)


def ack_probe(seq: int) -> None:
    """Call first thing in the probe job handler; the start time is taken before any I/O."""
    _RECORDER.ack(seq)


class Driver(abc.ABC):
    """What a Python driver implements; `main()` turns it into the command-line protocol."""

    name: str = "?"

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Version and capabilities: see README "info" for the keys."""

    def setup(self) -> None:  # noqa: B027 - optional hook, most drivers need no set-up
        """Connect before timing starts, so connection set-up is not counted as enqueue cost."""

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release clients; errors here do not fail the command."""

    @abc.abstractmethod
    def enqueue_one(self, n: int, lane: str) -> None:
        """Enqueue n no-op jobs, one API call per job."""

    @abc.abstractmethod
    def enqueue_bulk(self, n: int, lane: str, batch: int) -> None:
        """Enqueue n no-op jobs through the system's bulk API, `batch` at a time."""

    @abc.abstractmethod
    def enqueue_probe(self, seq: int, lane: str) -> None:
        """Enqueue one probe job whose handler calls ack_probe(seq)."""

    @abc.abstractmethod
    def run_worker(self, procs: int, lanes: list[str]) -> None:
        """Run `procs` worker processes on `lanes` until SIGTERM; block meanwhile."""


def _probe(driver: Driver, samples: int, warmup: int, gap_ms: float, lane: str) -> dict[str, Any]:
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(ACK_KEY)
    latencies: list[float] = []
    for seq in range(warmup + samples):
        sent = time.time()
        driver.enqueue_probe(seq, lane)
        while True:
            got = cast("list[bytes] | None", client.blpop([ACK_KEY], timeout=PROBE_ACK_TIMEOUT_S))
            if got is None:
                raise TimeoutError(f"probe {seq} not picked up within {PROBE_ACK_TIMEOUT_S} s")
            ack_seq, started = got[1].decode().split()
            if int(ack_seq) == seq:
                break
        if seq >= warmup:
            latencies.append((float(started) - sent) * 1000.0)
        # A jittered pause lets the worker go back to waiting, and keeps the samples from
        # locking onto the period of a polling worker.
        time.sleep(random.uniform(0.5, 1.5) * gap_ms / 1000.0)
    return {"latencies_ms": latencies}


def _timed(fn: Callable[[], None], n: int) -> dict[str, Any]:
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    return {"n": n, "seconds": seconds}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="benchmark driver (see bench/README.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info")
    for name in ("enqueue_one", "enqueue_bulk"):
        p = sub.add_parser(name)
        p.add_argument("--n", type=int, required=True)
        p.add_argument("--lane", choices=LANES, default="normal")
        p.add_argument("--batch", type=int, default=1000)
    p = sub.add_parser("worker")
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--lanes", default="normal")
    p = sub.add_parser("probe")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gap-ms", type=float, default=20.0)
    p.add_argument("--lane", choices=LANES, default="normal")
    return parser


def _answer(payload: dict[str, Any]) -> None:
    # The answer is the last stdout line; libraries may print banners before it.
    sys.stdout.write("\n" + json.dumps(payload) + "\n")
    sys.stdout.flush()


def main(driver: Driver, argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "worker":
        # Workers answer nothing: the harness reads their progress from Redis and stops them.
        driver.run_worker(args.procs, args.lanes.split(","))
        return
    try:
        driver.setup()
        if args.command == "info":
            result = {"system": driver.name, **driver.info()}
        elif args.command == "enqueue_one":
            result = _timed(lambda: driver.enqueue_one(args.n, args.lane), args.n)
        elif args.command == "enqueue_bulk":
            result = _timed(lambda: driver.enqueue_bulk(args.n, args.lane, args.batch), args.n)
        else:
            result = _probe(driver, args.samples, args.warmup, args.gap_ms, args.lane)
        _answer({"ok": True, **result})
    except Exception as exc:  # noqa: BLE001 - any failure must still reach the harness as JSON
        traceback.print_exc()
        _answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    finally:
        try:
            driver.teardown()
        except Exception:  # noqa: BLE001 - the answer is already out; only log
            traceback.print_exc()


def fan_out(procs: int, argv: Sequence[str]) -> None:
    """Run `procs` copies of a single-process worker command and forward SIGTERM to them.

    Only for systems whose own tooling has no multi-process supervisor: the copies are
    exactly what a user would start by hand, one per core.
    """
    children = [subprocess.Popen(list(argv)) for _ in range(procs)]

    def _forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    for child in children:
        child.wait()


def quiet_logging() -> None:
    """Keep every system at WARNING: per-job INFO lines would measure the terminal."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
