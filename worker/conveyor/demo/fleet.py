"""The demo's worker processes: two ``conveyor worker`` supervisors, and the harm done to them.

A "fast lane" serves only critical and high jobs and a "general" pool serves every class, the
way per-class Deployments would run in a cluster. Midway the demo ``kill -9``s one worker
process (its supervisor gives its jobs back at once) and SIGTERMs another (it drains);
each supervisor replaces its lost process. Worker processes are found through their records in
Redis and checked to be children of a supervisor this module started before any signal is sent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from conveyor.demo.env import ENV_PREFIX
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.workers import WorkerInfo, list_workers

LEASE_TTL = 5.0
"""Seconds a lease lasts without a heartbeat: how soon a killed worker's jobs run again."""
RUN_VAR = ENV_PREFIX + "RUN"
"""The variable whose value (unique per run) marks this run's processes."""
GRACE = 5.0
"""Seconds a SIGTERMed worker lets its running jobs finish."""


@dataclass(frozen=True)
class Pool:
    name: str
    classes: tuple[str, ...]
    processes: int
    concurrency: int


POOLS = (
    Pool("fast lane", ("critical", "high"), 1, 16),
    Pool("general", PRIORITY_CLASSES, 2, 16),
)


@dataclass(frozen=True)
class Harm:
    """One worker process the demo killed or stopped."""

    signal: str
    pool: str
    pid: int
    busy: int
    """Jobs it held leases on when the signal was sent."""
    jobs: tuple[str, ...]
    at: float
    """Seconds into the scenario."""


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _parent(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def _leases_by_worker(client: redis.Redis, keys: Keyspace) -> dict[str, list[str]]:
    """Jobs leased right now, by worker identity: the part of each lease token before its last
    ``/`` (tokens are ``<worker id>/<claim>:<n>``). Heartbeats report busy slots only every few
    seconds, too late for jobs that run for milliseconds."""
    pipe = client.pipeline(transaction=False)
    for priority in PRIORITY_CLASSES:
        pipe.zrange(keys.lease(priority), 0, -1)
    ids = [raw.decode() for chunk in pipe.execute() for raw in chunk]
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(keys.job(job_id), "lt")
    by_worker: dict[str, list[str]] = {}
    for job_id, token in zip(ids, pipe.execute(), strict=True):
        if token:
            by_worker.setdefault(token.decode().rsplit("/", 1)[0], []).append(job_id)
    return by_worker


class Fleet:
    def __init__(self, redis_url: str, queue: str, environ: dict[str, str], log: Path) -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.environ = environ
        self.log = log
        self.keys = Keyspace(queue)
        self.supervisors: dict[str, subprocess.Popen[bytes]] = {}
        self.seen: set[int] = set()
        """Every worker process pid seen, so none outlives the demo."""

    def _argv(self, pool: Pool) -> list[str]:
        return [
            sys.executable, "-m", "conveyor", "--redis-url", self.redis_url, "--queue",
            self.queue, "worker", "conveyor.demo.handlers", "--classes", ",".join(pool.classes),
            "--processes", str(pool.processes), "--concurrency", str(pool.concurrency),
            "--lease-ttl", str(LEASE_TTL), "--grace", str(GRACE),
        ]  # fmt: skip

    def start(self) -> None:
        with self.log.open("ab") as log:
            for pool in POOLS:
                # A session of its own: Ctrl-C reaches the demo, which stops the pools in order.
                self.supervisors[pool.name] = subprocess.Popen(
                    self._argv(pool),
                    env=self.environ,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def workers(self, client: redis.Redis) -> list[tuple[Pool, WorkerInfo]]:
        """Live worker processes of this fleet, by pool."""
        by_pid = {p.pid: name for name, p in self.supervisors.items()}
        pools = {pool.name: pool for pool in POOLS}
        out = []
        for info in list_workers(client, self.keys):
            name = by_pid.get(_parent(info.pid) or -1)
            if name is not None:
                self.seen.add(info.pid)
                out.append((pools[name], info))
        return out

    def dead_supervisors(self) -> list[str]:
        return [name for name, p in self.supervisors.items() if p.poll() is not None]

    def harm(
        self,
        client: redis.Redis,
        sig: signal.Signals,
        pools: tuple[str, ...],
        at: float,
        *,
        min_busy: int = 1,
    ) -> Harm | None:
        """Send ``sig`` to the live worker process of ``pools`` holding the most leases, if it
        holds at least ``min_busy``; None if there is none."""
        leased = _leases_by_worker(client, self.keys)
        candidates = [
            (pool, info, leased.get(info.identity, []))
            for pool, info in self.workers(client)
            if pool.name in pools and not info.draining
        ]
        candidates = [c for c in candidates if len(c[2]) >= min_busy]
        if not candidates:
            return None
        pool, victim, jobs = max(candidates, key=lambda c: len(c[2]))
        os.kill(victim.pid, sig)
        return Harm(sig.name, pool.name, victim.pid, len(jobs), tuple(jobs), at)

    def stop(self, timeout: float = GRACE + 15) -> None:
        """SIGTERM the supervisors (they drain their workers); kill whatever remains."""
        for process in self.supervisors.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.supervisors.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for process in self.supervisors.values():
            if process.poll() is None:
                self.seen.update(_children(process.pid))
                process.kill()
                process.wait()
        for pid in self.seen:
            self._kill_stray(pid)

    def _kill_stray(self, pid: int) -> None:
        """Kill ``pid`` if it is still one of ours: a pid may have been reused since, so the
        process must carry this run's environment."""
        run = self.environ.get(RUN_VAR)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return
        if run and f"{RUN_VAR}={run}".encode() in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
