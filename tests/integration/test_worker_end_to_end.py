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


def test_a_busy_worker_sends_its_acks_along_with_its_next_claim(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    """Jobs that finish free slots, so the claim that fills them carries their acks: a busy
    worker pays one function call per batch instead of two. Read from Redis's own log of
    every call (SLOWLOG at 0 us), not from the worker."""
    workers.start(concurrency=8)
    saved = redis_client.config_get("slowlog-*")
    redis_client.config_set("slowlog-max-len", 100_000)
    redis_client.config_set("slowlog-log-slower-than", 0)
    redis_client.slowlog_reset()
    try:
        ids = [r.id for r in tracked.enqueue_batch("noop", ({"i": i} for i in range(400)))]
        job_ledger.wait_rows(len(ids), timeout=30, outcome="ok")
        wait_until(lambda: all(tracked.get_job(i).state == "done" for i in ids), 5, "acks")
        calls = redis_client.slowlog_get(100_000)
    finally:
        redis_client.config_set("slowlog-log-slower-than", saved["slowlog-log-slower-than"])
        redis_client.config_set("slowlog-max-len", saved["slowlog-max-len"])
        redis_client.slowlog_reset()

    claims = [
        entry["command"].split()
        for entry in calls
        if entry["command"].startswith(b"FCALL conveyor_")
        and entry["command"].split()[1].endswith(b"_claim")
    ]
    # FCALL name 1 key n ttl prefix k, the k classes, then the acks' triples.
    carrying = [args for args in claims if len(args) > 8 + int(args[7])]
    assert len(carrying) >= 10, f"{len(carrying)} of {len(claims)} claims carried acks"
    assert {tracked.get_job(i).attempts for i in ids} == {1}
    assert_conserved(redis_client, tracked.keys.queue, ids)


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
