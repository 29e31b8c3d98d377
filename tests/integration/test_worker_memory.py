"""B33 (time-boxed): a worker process's memory does not grow with the jobs it runs, whether
they succeed or fail with large tracebacks."""

from __future__ import annotations

import pytest

from conveyor.queue import Queue
from tests.support.workers import Workers, rss_bytes, wait_until

pytest_plugins = ["tests.support.worker_fixtures"]


def _run(queue: Queue, ok: int, failing: int, dead_before: int) -> None:
    queue.enqueue_batch("soak_noop", ({"i": i} for i in range(ok)))
    queue.enqueue_batch("soak_fail", ({"i": i} for i in range(failing)), max_attempts=1)

    def drained() -> bool:
        stats = queue.stats()
        busy = sum(s.ready + s.due_delayed + s.future_delayed + s.in_flight for s in stats)
        return busy == 0 and sum(s.dead for s in stats) == dead_before + failing

    wait_until(drained, 600, f"{ok} + {failing} jobs to finish", interval=0.2)


LONG = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.mark.parametrize("scale", [1, pytest.param(10, marks=LONG)])
def test_a_worker_process_does_not_grow_over_thousands_of_jobs(
    scale: int, workers: Workers, queue: Queue
) -> None:
    worker = workers.start(concurrency=16)
    pid = worker.child()

    _run(queue, 2_000 * scale, 200 * scale, 0)
    warm = rss_bytes(pid)
    _run(queue, 18_000 * scale, 1_800 * scale, 200 * scale)
    end = rss_bytes(pid)

    growth = end - warm
    print(
        f"B33-lite x{scale}: RSS {warm / 2**20:.1f} MiB after warm-up, {end / 2**20:.1f} MiB "
        f"after {22_000 * scale} jobs ({growth / 2**20:+.1f} MiB)"
    )
    assert worker.child() == pid
    assert growth < 0.10 * warm or growth < 30 * 2**20
