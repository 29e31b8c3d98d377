"""The measured scenarios. Each one starts from a flushed Redis and leaves no worker behind."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from harness import proctree
from harness.driver import DriverClient
from harness.procs import Background, CommandError
from harness.redis_server import RedisServer
from harness.stats import percentile

DONE_KEY = "bench:done"
POLL_S = 0.05


@dataclass(frozen=True)
class Sizes:
    enqueue_one: int
    jobs: int  # bulk enqueue, memory per job and each drain
    pickup_samples: int
    low_jobs: int  # backlog behind the critical probes
    critical_samples: int
    drain_cap_s: float  # wall-clock cap per drain; a slower system gets a partial rate
    gap_ms: float = 20.0
    batch: int = 1000

    def enqueue_timeout(self, n: int) -> float:
        # Generous: the slowest peer enqueues well above 100 jobs/s even on a busy machine.
        return 120.0 + n / 100.0


QUICK = Sizes(
    enqueue_one=500,
    jobs=2000,
    pickup_samples=30,
    low_jobs=10_000,
    critical_samples=20,
    drain_cap_s=20.0,
)
DEFAULT = Sizes(
    enqueue_one=5000,
    jobs=20000,
    pickup_samples=200,
    low_jobs=100_000,
    critical_samples=100,
    drain_cap_s=150.0,
)


class Context:
    def __init__(self, server: RedisServer, driver: DriverClient, sizes: Sizes, run: int) -> None:
        self.server = server
        self.driver = driver
        self.sizes = sizes
        self.run = run

    def done(self) -> tuple[int, float, float]:
        with self.server.client() as c:
            reply = c.call("HMGET", DONE_KEY, "n", "first", "last")
        if not isinstance(reply, list) or not all(isinstance(v, bytes) for v in reply):
            return 0, 0.0, 0.0  # nothing recorded yet
        n, first, last = (v for v in reply if isinstance(v, bytes))
        return int(n), float(first), float(last)


def _stop(worker: Background) -> None:
    worker.stop(grace=10)


def enqueue_one(ctx: Context) -> dict[str, Any]:
    ctx.server.flush()
    n = ctx.sizes.enqueue_one
    ans = ctx.driver.call("enqueue_one", "--n", n, timeout=ctx.sizes.enqueue_timeout(n))
    return {"enqueue_one_jps": n / ans["seconds"]}


def bulk_and_drain(ctx: Context, procs: int) -> dict[str, Any]:
    """Fill the queue through the bulk API, then drain it with `procs` worker processes.

    The one-process round also yields bulk enqueue speed, Redis memory per queued job and
    the worker's memory after the drain, so the queue is only filled twice per run.
    """
    s = ctx.sizes
    ctx.server.flush()
    before = ctx.server.used_memory()
    ans = ctx.driver.call(
        "enqueue_bulk", "--n", s.jobs, "--batch", s.batch, timeout=s.enqueue_timeout(s.jobs)
    )
    after = ctx.server.used_memory()
    out: dict[str, Any] = {}
    if procs == 1:
        out["enqueue_bulk_jps"] = s.jobs / ans["seconds"]
        out["redis_bytes_per_job"] = (after - before) / s.jobs

    worker = ctx.driver.start_worker(procs, ["normal"], f"drain{procs}-run{ctx.run}")
    try:
        started = time.monotonic()
        while True:
            n, first, last = ctx.done()
            if n >= s.jobs:
                break
            if not worker.alive():
                raise CommandError(f"worker exited during the drain: {worker.log_tail(600)}")
            if time.monotonic() - started > s.drain_cap_s:
                if n < 100:
                    raise CommandError(f"only {n} of {s.jobs} jobs done in {s.drain_cap_s:.0f} s")
                cap = f"{s.drain_cap_s:.0f} s"
                out[f"drain_{procs}p_partial"] = f"{n} of {s.jobs} jobs in the {cap} cap"
                break
            time.sleep(POLL_S)
        out[f"drain_{procs}p_jps"] = n / (last - first) if last > first else float("nan")
        if n > s.jobs:
            out[f"drain_{procs}p_extra_executions"] = n - s.jobs
        if procs == 1:
            mem = proctree.tree_memory(worker.pid)
            out["worker_rss_mib"] = mem["rss_mib"]
            out["worker_pss_mib"] = mem["pss_mib"]
            out["worker_processes"] = mem["processes"]
    finally:
        _stop(worker)
    return out


def _latency_figures(prefix: str, latencies: list[float]) -> dict[str, Any]:
    return {
        f"{prefix}_p50_ms": percentile(latencies, 50),
        f"{prefix}_p99_ms": percentile(latencies, 99),
        f"{prefix}_samples": latencies,
    }


def pickup(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    ctx.server.flush()
    worker = ctx.driver.start_worker(1, ["normal"], f"pickup-run{ctx.run}")
    try:
        # The warm-up probes double as the readiness check: the first one waits for start-up.
        ans = ctx.driver.call(
            "probe",
            "--samples",
            s.pickup_samples,
            "--warmup",
            3,
            "--gap-ms",
            s.gap_ms,
            timeout=180 + s.pickup_samples * 2.0,
        )
    finally:
        _stop(worker)
    return _latency_figures("pickup", ans["latencies_ms"])


def critical(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    ctx.server.flush()
    ctx.driver.call(
        "enqueue_bulk",
        "--n",
        s.low_jobs,
        "--lane",
        "low",
        "--batch",
        s.batch,
        timeout=s.enqueue_timeout(s.low_jobs),
    )
    return critical_probes(ctx, "low", s.low_jobs, s.critical_samples, f"critical-run{ctx.run}")


def critical_probes(
    ctx: Context, backlog_lane: str, backlog: int, samples: int, tag: str
) -> dict[str, Any]:
    """Critical probes against a worker busy on an already-queued backlog of `backlog` jobs.

    The backlog counts from the `bench:done` reading when the worker starts, so a caller may
    hand over a queue another worker has partly drained.
    """
    s = ctx.sizes
    done_before = ctx.done()[0]
    worker = ctx.driver.start_worker(1, ["critical", backlog_lane], tag)
    try:
        deadline = time.monotonic() + 120
        while ctx.done()[0] == done_before:
            if not worker.alive():
                raise CommandError(f"worker exited: {worker.log_tail(600)}")
            if time.monotonic() > deadline:
                raise CommandError("worker did not start on the backlog within 120 s")
            time.sleep(POLL_S)
        ans = ctx.driver.call(
            "probe",
            "--samples",
            samples,
            "--warmup",
            2,
            "--gap-ms",
            s.gap_ms,
            "--lane",
            "critical",
            timeout=180 + samples * 2.0,
        )
        remaining = backlog - (ctx.done()[0] - done_before)
    finally:
        _stop(worker)
    out = _latency_figures("critical", ans["latencies_ms"])
    out["critical_low_remaining"] = remaining
    if remaining <= 0:
        # Without a backlog this degenerates into idle pickup; say so rather than mislead.
        out["critical_note"] = f"{backlog_lane} backlog ran out before sampling ended"
    return out
