"""B09, B10: a timeout is a failed attempt (retried at its backoff, then dead-lettered), the
handler can tell it from a shutdown, and a sync handler that ignores it is stopped together
with its threads and child processes while the worker carries on."""

from __future__ import annotations

import time
from pathlib import Path

from conveyor.execution import TIMEOUT
from conveyor.job import Backoff
from conveyor.queue import Queue
from tests.support.workers import Ledger, Workers, alive, assert_conserved, wait_until

pytest_plugins = ["tests.support.worker_fixtures"]


def test_a_timed_out_attempt_fails_as_timeout_and_retries_after_its_backoff(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    workers.start()
    timeout, base = 1.0, 0.5
    job_id = tracked.enqueue(
        "drainable",
        {"seconds": 10, "later_seconds": 10},
        timeout=timeout,
        max_attempts=3,
        backoff=Backoff(base=base, cap=10, jitter=False),
    ).id

    wait_until(lambda: tracked.get_job(job_id).state == "dead", 15, "the dead letter")

    started = job_ledger.rows(job_id=job_id, outcome="started")
    stopped = job_ledger.rows(job_id=job_id, outcome="cancelled")
    assert [r["attempt"] for r in started] == [1, 2, 3]
    # The handler's cleanup saw the timeout's own cancellation message, not a shutdown's.
    assert [r["reason"] for r in stopped] == [TIMEOUT] * 3
    for run in stopped:
        assert timeout <= run["t_end"] - run["t_start"] <= timeout + 0.3
    t1, t2, t3 = (r["t_start"] for r in started)
    print(f"B09: attempts started at 0, {t2 - t1:.2f}s, {t3 - t1:.2f}s")
    assert timeout + base <= t2 - t1 <= timeout + base + 0.5
    assert timeout + 2 * base <= t3 - t2 <= timeout + 2 * base + 0.5
    info = tracked.get_job(job_id)
    assert (info.dead_reason, info.attempts) == ("timeout", 3)
    assert [e["reason"] for e in info.errors] == ["timeout"] * 3
    assert_conserved(tracked.client, tracked.keys.queue, [job_id])


def test_a_sync_handler_ignoring_its_timeout_is_stopped_with_its_threads_and_children(
    workers: Workers, tracked: Queue, job_ledger: Ledger, tmp_path: Path
) -> None:
    timeout, kill_grace = 1.0, 1.0
    worker = workers.start(concurrency=1, kill_grace=kill_grace)
    first_process = worker.child()
    touched = tmp_path / "touched"
    job_id = tracked.enqueue("runaway", {"touch": str(touched)}, timeout=timeout, max_attempts=1).id
    next_id = tracked.enqueue("noop", {}).id

    started = job_ledger.wait_rows(1, timeout=10, job_id=job_id)[0]
    bound = started["t_start"] + timeout + kill_grace + 1
    wait_until(lambda: not alive(started["child_pid"]), bound - time.time(), "the child to die")
    gone_after = time.time() - started["t_start"]
    mtime = touched.stat().st_mtime
    time.sleep(0.5)

    print(f"B10: runaway handler's child process gone {gone_after:.2f}s after the start")
    assert touched.stat().st_mtime == mtime, "the handler's thread is still running"
    next_run = job_ledger.wait_rows(1, timeout=5, job_id=next_id)[0]
    assert next_run["t_start"] <= bound
    info = tracked.get_job(job_id)
    assert (info.state, info.dead_reason) == ("dead", "timeout")
    assert worker.process.poll() is None, "the supervisor exited"
    assert len(worker.logs(event="process_recycled")) == 1
    assert worker.child() != first_process
    wait_until(lambda: tracked.get_job(next_id).state == "done", 5, "the next job's ack")
    assert_conserved(tracked.client, tracked.keys.queue, [job_id, next_id])
