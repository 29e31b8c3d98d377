"""Real worker processes run what producers enqueue: once each, acked, N at a time, promptly."""

from __future__ import annotations

import random
import statistics
import time

import redis

from conveyor.queue import Queue
from tests.support.workers import Ledger, Workers, assert_conserved, max_overlap, wait_until

pytest_plugins = ["tests.support.worker_fixtures"]


def test_every_enqueued_job_runs_once_and_is_acked(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    workers.start(concurrency=8)
    ids = [r.id for r in tracked.enqueue_batch("noop", ({"i": i} for i in range(60)))]
    ids += [r.id for r in tracked.enqueue_batch("sync_sleep", [{"seconds": 0.05}] * 10)]
    ids += [r.id for r in tracked.enqueue_batch("sleep", [{"seconds": 0.05}] * 10)]

    job_ledger.wait_rows(len(ids), timeout=20, outcome="ok")
    wait_until(lambda: all(tracked.get_job(i).state == "done" for i in ids), 5, "acks")

    rows = job_ledger.rows(outcome="ok")
    assert sorted(r["job_id"] for r in rows) == sorted(ids)
    assert {tracked.get_job(i).attempts for i in ids} == {1}
    taken = assert_conserved(redis_client, tracked.keys.queue, ids)
    assert taken.states["done"] == set(ids)


def test_a_worker_never_runs_more_jobs_at_once_than_its_concurrency(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    workers.start(concurrency=3)
    tracked.enqueue_batch("sleep", [{"seconds": 0.3}] * 9)
    tracked.enqueue_batch("sync_sleep", [{"seconds": 0.3}] * 6)

    rows = job_ledger.wait_rows(15, timeout=20, outcome="ok")

    # Three at a time exactly: more breaks the limit, fewer means jobs were not run in parallel.
    assert max_overlap((r["t_start"], r["t_end"]) for r in rows) == 3


def test_an_idle_worker_starts_a_new_job_within_milliseconds(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    workers.start(concurrency=4)
    latencies = []
    for i in range(100):
        time.sleep(random.uniform(0.01, 0.03))
        before = time.time()
        job_id = tracked.enqueue("noop", {"i": i}).id
        row = job_ledger.wait_rows(1, timeout=5, job_id=job_id)[0]
        latencies.append(row["t_start"] - before)

    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[98]
    print(f"idle pickup enqueue->start: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    # Wake-ups, not polling: a worker that polled every 50 ms would miss both bounds.
    assert p50 < 0.02, f"median pickup {p50 * 1000:.1f} ms"
    assert p99 < 0.075, f"p99 pickup {p99 * 1000:.1f} ms"
