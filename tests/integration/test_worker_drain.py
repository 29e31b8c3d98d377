"""B27: SIGTERM drains: claiming stops at once, running jobs get the grace period, the rest are
handed back with their attempt refunded, and the process exits 0 in time."""

from __future__ import annotations

import signal
import time

from conveyor.execution import SHUTDOWN
from conveyor.queue import Queue
from tests.support.workers import (
    REPO_ROOT,
    Ledger,
    Workers,
    assert_conserved,
    events_of,
    wait_until,
)

pytest_plugins = ["tests.support.worker_fixtures"]

ENTRYPOINT = [str(REPO_ROOT / ".venv" / "bin" / "conveyor"), "worker", "tests.support.tasks"]
"""Dockerfile.worker's exec-form ENTRYPOINT (``conveyor worker``) with the test's handlers."""


def test_sigterm_stops_claiming_hands_back_the_unfinished_job_and_exits_within_grace(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    grace = 2.0
    w1 = workers.start(grace=grace)
    long_job = tracked.enqueue("drainable", {"seconds": 30, "later_seconds": 0.3}).id
    job_ledger.wait_rows(1, timeout=10, job_id=long_job)

    signalled = time.monotonic()
    w1.signal(signal.SIGTERM)
    w1.wait_for_log(1, event="drain_started")
    late_job = tracked.enqueue("noop", {}).id
    assert w1.wait(grace + 3) == 0
    exited_after = time.monotonic() - signalled

    print(f"B27(a): exit 0 {exited_after:.2f}s after SIGTERM with grace {grace}s")
    assert grace <= exited_after <= grace + 1.5
    assert tracked.get_job(late_job).state == "queued", "a draining worker claimed a job"
    stopped = job_ledger.rows(job_id=long_job, outcome="cancelled")
    assert [r["reason"] for r in stopped] == [SHUTDOWN]
    info = tracked.get_job(long_job)
    assert (info.state, info.attempts, info.errors) == ("queued", 0, [])
    assert ("handed_back", 1, "drain") in events_of(tracked.client, tracked.keys.queue, long_job)
    assert_conserved(tracked.client, tracked.keys.queue, [long_job, late_job])

    workers.start()
    wait_until(
        lambda: all(tracked.get_job(j).state == "done" for j in (long_job, late_job)),
        10,
        "another worker to run both jobs",
    )
    assert tracked.get_job(long_job).attempts == 1
    assert len(job_ledger.rows(job_id=long_job, outcome="started")) == 2


def test_a_job_finishing_during_the_drain_is_acked_before_exit_and_never_run_again(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    w1 = workers.start(grace=5)
    job_id = tracked.enqueue("sleep", {"seconds": 1.5}).id
    started = job_ledger.wait_rows(1, timeout=10, job_id=job_id)[0]
    time.sleep(max(0.0, started["t_start"] + 0.5 - time.time()))

    signalled = time.monotonic()
    w1.signal(signal.SIGTERM)
    assert w1.wait(8) == 0
    exited_after = time.monotonic() - signalled

    print(f"B27(b): job finished and acked, exit {exited_after:.2f}s after SIGTERM")
    assert exited_after < 2.5, "the worker waited for more than its running job"
    assert tracked.get_job(job_id).state == "done"
    workers.start()
    time.sleep(1)
    assert [r["outcome"] for r in job_ledger.rows(job_id=job_id)] == ["started", "ok"]
    assert_conserved(tracked.client, tracked.keys.queue, [job_id])


def test_the_container_entrypoint_drains_on_sigterm_and_hands_back_at_once_on_a_second(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    worker = workers.start(argv=ENTRYPOINT, grace=30)
    job_id = tracked.enqueue("drainable", {"seconds": 60}).id
    job_ledger.wait_rows(1, timeout=10, job_id=job_id)

    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    worker.wait_for_log(1, event="drain_started")
    drain_logged = time.monotonic() - signalled
    time.sleep(0.3)
    again = time.monotonic()
    worker.signal(signal.SIGTERM)
    worker.wait_for_log(1, event="drain_hurried")
    assert worker.wait(3) == 0
    exited_after = time.monotonic() - again

    print(
        f"B27(c): drain logged {drain_logged:.2f}s after SIGTERM; exit {exited_after:.2f}s "
        "after the second"
    )
    assert drain_logged <= 1
    assert exited_after <= 1.5
    info = tracked.get_job(job_id)
    assert (info.state, info.attempts) == ("queued", 0)
    assert [r["outcome"] for r in job_ledger.rows(job_id=job_id)] == ["started", "cancelled"]
    assert_conserved(tracked.client, tracked.keys.queue, [job_id])
