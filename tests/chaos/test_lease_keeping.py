"""B06: a long or blocking job keeps or loses its lease cleanly, and an ack that meets a broken
connection is sent again with the same lease token: never two successes of one job."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from conveyor.local import RedisServer
from conveyor.queue import Queue
from tests.support.proxy import TcpProxy
from tests.support.workers import (
    DEFAULTS,
    Ledger,
    Workers,
    assert_conserved,
    events_of,
    wait_until,
)

pytest_plugins = ["tests.support.worker_fixtures"]

LEASE_TTL = float(DEFAULTS["lease_ttl"])


def _completions(client: redis.Redis, queue: Queue, job_id: str) -> list[int]:
    events = events_of(client, queue.keys.queue, job_id)
    return [attempt for kind, attempt, _ in events if kind == "completed"]


def test_a_job_longer_than_its_lease_keeps_it_by_heartbeats_and_runs_once(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    for _ in range(3):
        workers.start()
    job_id = tracked.enqueue("sleep", {"seconds": 6}).id
    job_ledger.wait_rows(1, timeout=10, job_id=job_id)

    deadlines = set()
    while tracked.get_job(job_id).state == "active":
        deadline = redis_client.hget(tracked.keys.job(job_id), "ld")
        if deadline:
            deadlines.add(deadline)
        time.sleep(0.2)

    print(f"B06(1): lease renewed {len(deadlines) - 1} times over 6 s")
    assert len(deadlines) - 1 >= 4, "too few renewals for 6 s with a 1 s heartbeat"
    assert [r["outcome"] for r in job_ledger.rows(job_id=job_id)] == ["started", "ok"]
    assert tracked.get_job(job_id).attempts == 1
    assert _completions(redis_client, tracked, job_id) == [1]
    assert_conserved(redis_client, tracked.keys.queue, [job_id])


def test_a_handler_holding_the_gil_past_its_lease_never_completes_the_job_twice(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    pool = [workers.start() for _ in range(3)]
    job_id = tracked.enqueue("gil_hold", {"seconds": 5, "first_only": True}).id

    wait_until(lambda: tracked.get_job(job_id).state == "done", 30, "the job to finish")
    wait_until(
        lambda: (
            len(job_ledger.rows(job_id=job_id, outcome="ok"))
            == len(job_ledger.rows(job_id=job_id, outcome="started"))
        ),
        30,
        "every run to end",
    )
    time.sleep(1)  # the first run's late completion, if any, has been reported by now
    first = min(job_ledger.rows(job_id=job_id, outcome="ok"), key=lambda r: r["attempt"])

    assert first["attempt"] == 1
    assert first["held"] >= LEASE_TTL + 1, "the GIL was not held long enough to test anything"
    assert len(_completions(redis_client, tracked, job_id)) == 1
    runs = job_ledger.rows(job_id=job_id, outcome="started")
    print(f"B06(2): GIL held {first['held']:.1f}s; {len(runs)} runs, one completion")
    if len(runs) > 1:
        info = tracked.get_job(job_id)
        assert [(e["attempt"], e["reason"]) for e in info.errors] == [(1, "worker_lost")]
        assert _completions(redis_client, tracked, job_id) == [2]
        w1 = next(w for w in pool if first["pid"] in w.children())
        refused = w1.logs(event="ack_stale", job_id=job_id) + w1.logs(
            event="lease_lost", job_id=job_id
        )
        assert refused, "the first run's completion was neither rejected nor abandoned"
    assert_conserved(redis_client, tracked.keys.queue, [job_id])


def test_an_ack_cut_off_by_a_connection_reset_is_sent_again_with_the_same_token(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_server: RedisServer, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with TcpProxy(redis_server.port) as proxy:
        worker = workers.start(redis_url=proxy.url)
        job_id = tracked.enqueue("gated", {"gate": str(gate)}).id
        job_ledger.wait_rows(1, timeout=10, job_id=job_id)

        proxy.set_mode("reset")
        gate.touch()
        worker.wait_for_log(5, event="report_retry")
        time.sleep(1)
        proxy.set_mode("pass")

        wait_until(lambda: tracked.get_job(job_id).state == "done", 10, "the ack")
        worker.wait_for_log(5, event="report_recovered")
    assert len(job_ledger.rows(job_id=job_id)) == 1
    info = tracked.get_job(job_id)
    assert (info.attempts, info.errors) == (1, [])
    assert _completions(tracked.client, tracked, job_id) == [1]
    assert not worker.logs(event="ack_stale")
    assert_conserved(tracked.client, tracked.keys.queue, [job_id])


def test_an_ack_on_a_silently_dropped_connection_is_sent_again_before_the_lease_expires(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The peer vanishes without a FIN: only the worker's socket timeout (10 s) notices, so
    the lease must outlast it, as the defaults (30 s) do."""
    gate = tmp_path / "gate"
    with TcpProxy(redis_server.port) as proxy:
        worker = workers.start(redis_url=proxy.url, lease_ttl=15, heartbeat=1)
        job_id = tracked.enqueue("gated", {"gate": str(gate)}).id
        job_ledger.wait_rows(1, timeout=10, job_id=job_id)

        proxy.set_mode("blackhole")
        gate.touch()
        time.sleep(2)
        proxy.set_mode("pass")  # new connections work; the frozen ones stay frozen

        wait_until(lambda: tracked.get_job(job_id).state == "done", 20, "the ack")
    assert len(job_ledger.rows(job_id=job_id)) == 1
    info = tracked.get_job(job_id)
    assert (info.attempts, info.errors) == (1, [])
    assert _completions(tracked.client, tracked, job_id) == [1]
    assert not worker.logs(event="ack_stale")
    assert_conserved(tracked.client, tracked.keys.queue, [job_id])
