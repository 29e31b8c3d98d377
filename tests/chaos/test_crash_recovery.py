"""B02, B03, B04: a worker killed mid-job gives the job back, and a job that keeps killing its
worker still reaches the dead-letter queue after its attempt budget, at its backoff pace."""

from __future__ import annotations

import itertools
import time

import pytest
import redis

from conveyor.job import Backoff
from conveyor.queue import Queue
from tests.support.workers import (
    DEFAULTS,
    Ledger,
    Workers,
    alive,
    assert_conserved,
    events_of,
    wait_until,
)

pytest_plugins = ["tests.support.worker_fixtures"]

LEASE_TTL = float(DEFAULTS["lease_ttl"])
SWEEP = float(DEFAULTS["sweep_interval"]) * 1.2  # the sweeper's interval has 20 % jitter
QUICK = Backoff(base=0.2, cap=1, jitter=False)


def _done(queue: Queue, job_id: str) -> bool:
    return queue.get_job(job_id).state == "done"


def test_a_handler_killed_like_an_oom_kill_runs_again_and_is_never_acked_for_it(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    worker = workers.start()
    first_process = worker.child()
    job_id = tracked.enqueue("kill_self", {"once": True}, backoff=QUICK).id

    killed, ok = job_ledger.wait_rows(2, timeout=15, job_id=job_id)

    assert (killed["outcome"], killed["attempt"]) == ("killed", 1)
    assert (ok["outcome"], ok["attempt"]) == ("ok", 2)
    rerun_after = ok["t_start"] - killed["t_start"]
    print(f"B02: re-run {rerun_after:.2f}s after the kill")
    assert rerun_after <= LEASE_TTL + SWEEP + QUICK.base + 1
    wait_until(lambda: _done(tracked, job_id), 5, "the ack of attempt 2")
    info = tracked.get_job(job_id)
    assert info.attempts == 2
    assert [(e["attempt"], e["reason"]) for e in info.errors] == [(1, "worker_lost")]
    completed = [
        e for e in events_of(redis_client, tracked.keys.queue, job_id) if e[0] == "completed"
    ]
    assert [attempt for _, attempt, _ in completed] == [2]
    died = worker.logs(event="process_died")
    assert len(died) == 1
    assert "SIGKILL" in died[0]["message"]
    assert worker.child() != first_process
    assert_conserved(redis_client, tracked.keys.queue, [job_id])


@pytest.mark.parametrize("max_attempts", [3, 1])
def test_a_job_on_a_worker_killed_with_its_process_group_is_recovered_by_another_worker(
    max_attempts: int,
    workers: Workers,
    tracked: Queue,
    job_ledger: Ledger,
    redis_client: redis.Redis,
) -> None:
    pool = [workers.start(), workers.start()]
    job_id = tracked.enqueue(
        "drainable",
        {"seconds": 60, "later_seconds": 0.5},
        max_attempts=max_attempts,
        backoff=QUICK,
    ).id
    first = job_ledger.wait_rows(1, timeout=10, job_id=job_id)[0]
    w1 = next(w for w in pool if first["pid"] in w.children())
    w2 = next(w for w in pool if w is not w1)

    w1.kill_everything()
    killed_at = time.time()
    wait_until(lambda: not alive(w1.pid) and not alive(first["pid"]), 5, "W1 to die")

    if max_attempts == 1:
        wait_until(lambda: tracked.get_job(job_id).state == "dead", 10, "dead letter")
        dead_after = time.time() - killed_at
        print(f"B03 (max_attempts=1): dead-lettered {dead_after:.2f}s after the kill")
        assert dead_after <= LEASE_TTL + SWEEP + 1
        info = tracked.get_job(job_id)
        assert (info.dead_reason, info.attempts) == ("worker_lost", 1)
        assert len(job_ledger.rows(job_id=job_id)) == 1
    else:
        second = job_ledger.wait_rows(2, timeout=15, job_id=job_id, outcome="started")[1]
        recovered_after = second["t_start"] - killed_at
        print(f"B03: W2 started the job {recovered_after:.2f}s after W1 was killed")
        assert second["pid"] in w2.children()
        assert second["attempt"] == 2
        assert recovered_after <= LEASE_TTL + SWEEP + 1
        wait_until(lambda: _done(tracked, job_id), 10, "the job to finish on W2")
        info = tracked.get_job(job_id)
        assert info.attempts == 2
        assert [(e["attempt"], e["reason"]) for e in info.errors] == [(1, "worker_lost")]
        assert [r["outcome"] for r in job_ledger.rows(job_id=job_id)] == ["started"] * 2 + ["ok"]
    assert_conserved(redis_client, tracked.keys.queue, [job_id])


def test_a_job_that_always_kills_its_worker_is_dead_lettered_after_its_attempts_at_backoff_pace(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    lease_ttl = 1.5
    worker = workers.start(lease_ttl=lease_ttl, heartbeat=0.5)
    backoff = Backoff(base=1, cap=10, jitter=False)
    poison = tracked.enqueue("kill_self", {}, max_attempts=3, backoff=backoff).id
    normal = [r.id for r in tracked.enqueue_batch("noop", ({"i": i} for i in range(10)))]

    wait_until(lambda: tracked.get_job(poison).state == "dead", 30, "the poison job to die")

    runs = job_ledger.rows(job_id=poison)
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    starts = [r["t_start"] for r in runs]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    print(f"B04: gaps between runs {', '.join(f'{g:.2f}s' for g in gaps)}")
    # Each crash is noticed when the lease expires, then the retry waits its backoff (1 s, 2 s).
    assert gaps[0] >= lease_ttl + 1 - 0.05
    assert gaps[1] >= lease_ttl + 2 - 0.05
    info = tracked.get_job(poison)
    assert (info.dead_reason, info.attempts) == ("worker_lost", 3)

    wait_until(lambda: all(_done(tracked, j) for j in normal), 15, "the normal jobs")
    assert sorted(r["job_id"] for r in job_ledger.rows(outcome="ok")) == sorted(normal)
    time.sleep(lease_ttl + 2)
    assert len(job_ledger.rows(job_id=poison)) == 3, "a fourth run after the dead letter"
    assert worker.process.poll() is None, "the supervisor exited"
    assert len(worker.logs(event="process_died")) == 3
    assert len(worker.logs(event="process_started")) == 4
    worker.child()
    assert_conserved(redis_client, tracked.keys.queue, [poison, *normal])
