"""B02, B03, B04: a worker killed mid-job gives the job back, and a job that keeps killing its
worker still reaches the dead-letter queue after its attempt budget, at its backoff pace."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter

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
    max_overlap,
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
    # The supervisor reports each crash at once (the last test below), yet every retry still
    # waits out its backoff (1 s, 2 s): a job that kills its worker never loops at full speed.
    assert gaps[0] >= 1 - 0.05
    assert gaps[1] >= 2 - 0.05
    info = tracked.get_job(poison)
    assert (info.dead_reason, info.attempts) == ("worker_lost", 3)

    wait_until(lambda: all(_done(tracked, j) for j in normal), 15, "the normal jobs")
    # A normal job leased beside the poison job dies with it (its run may even have finished,
    # unacknowledged): it runs again, and every extra run is one that died with its process.
    oks = Counter(r["job_id"] for r in job_ledger.rows(outcome="ok"))
    assert set(oks) == set(normal)
    for job_id in normal:
        lost = [e for e in tracked.get_job(job_id).errors if e["reason"] == "worker_lost"]
        assert oks[job_id] <= 1 + len(lost), f"{job_id} ran again without a crash"
    time.sleep(lease_ttl + 2)
    assert len(job_ledger.rows(job_id=poison)) == 3, "a fourth run after the dead letter"
    assert worker.process.poll() is None, "the supervisor exited"
    assert len(worker.logs(event="process_died")) == 3
    assert len(worker.logs(event="process_started")) == 4
    worker.child()
    assert_conserved(redis_client, tracked.keys.queue, [poison, *normal])


def test_a_worker_process_that_dies_has_its_jobs_recovered_by_its_supervisor_at_once(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    """The supervisor sees its process die and recovers that process's leases itself: with a
    30 s lease the jobs still run again within seconds, on the replacement process."""
    worker = workers.start(lease_ttl=30, heartbeat=5, concurrency=4)
    ids = [
        tracked.enqueue("drainable", {"seconds": 60, "later_seconds": 0.1}, backoff=QUICK).id
        for _ in range(3)
    ]
    first_runs = job_ledger.wait_rows(3, timeout=10, outcome="started")
    victim = worker.child()
    assert {row["pid"] for row in first_runs} == {victim}

    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()

    for job_id in ids:
        wait_until(lambda j=job_id: _done(tracked, j), 10, f"job {job_id} to run again")
    rerun_after = (
        max(row["t_start"] for row in job_ledger.rows(outcome="started") if row["pid"] != victim)
        - killed_at
    )
    print(f"re-run {rerun_after:.2f}s after the kill (lease 30 s)")
    assert rerun_after < 8, "the jobs waited for their leases instead of being recovered"
    for job_id in ids:
        info = tracked.get_job(job_id)
        assert info.attempts == 2
        assert [(e["attempt"], e["reason"]) for e in info.errors] == [(1, "worker_lost")]
        assert "SIGKILL" in info.errors[0]["error"]
    assert len(worker.logs(event="process_died")) == 1
    released = worker.logs(event="process_released")
    assert len(released) == 1
    assert "recovered 3 leased jobs" in released[0]["message"]
    assert_conserved(redis_client, tracked.keys.queue, ids)


def test_jobs_whose_process_died_run_again_one_at_a_time(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    """Which of the jobs a dead process held killed it is unknown, so each runs again alone:
    a poison job then dies by itself and takes no other job down with it again."""
    worker = workers.start(concurrency=4)
    gate = [
        tracked.enqueue("drainable", {"seconds": 60, "later_seconds": 0.3}).id for _ in range(3)
    ]
    job_ledger.wait_rows(3, timeout=10, outcome="started")
    poison = tracked.enqueue("kill_self", {}, max_attempts=2, backoff=QUICK).id

    wait_until(lambda: tracked.get_job(poison).state == "dead", 20, "the poison job to die")
    for job_id in gate:
        wait_until(lambda j=job_id: _done(tracked, j), 10, f"job {job_id}")
    second_runs = [
        (row["t_start"], row["t_end"])
        for row in job_ledger.rows(outcome="ok")
        if row["job_id"] in gate
    ]
    assert len(second_runs) == 3
    assert max_overlap(second_runs) == 1, "suspects ran side by side"
    for job_id in gate:
        info = tracked.get_job(job_id)
        assert (info.attempts, [e["reason"] for e in info.errors]) == (2, ["worker_lost"])
    assert len(worker.logs(event="job_alone")) >= 4
    assert len(worker.logs(event="process_died")) == 2
    assert_conserved(redis_client, tracked.keys.queue, [poison, *gate])
