"""B22: strict priority must not starve a lower class forever.

A producer keeps more than a hundred critical jobs ready; a single low job must still start
within the queue's starvation bound, while critical work keeps nearly all of the capacity.
The bound is shortened to 1 s here (10 s by default) to keep the test quick.
"""

from __future__ import annotations

import time

from conveyor.config import QueueConfig
from conveyor.queue import Queue
from tests.support.scripted import ScriptedWorker

BOUND = 1.0


def test_a_low_job_starts_within_the_starvation_bound_under_sustained_critical_load(
    queue: Queue, redis_url: str
) -> None:
    queue.configure(QueueConfig(starvation_bound=BOUND))
    worker = ScriptedWorker(redis_url, queue.keys)
    queue.enqueue_batch("urgent", [{}] * 150, priority="critical")
    low = queue.enqueue("report", {}, priority="low").id
    enqueued = time.monotonic()

    started_low_after = None
    served = {"critical": 0, "low": 0}
    while time.monotonic() - enqueued < BOUND * 3:
        jobs = worker.claim(4).jobs
        for job in jobs:
            served[job.priority] += 1
            if job.id == low:
                started_low_after = time.monotonic() - enqueued
        worker.ack(*jobs)
        # Keep the critical backlog above a hundred, as a busy producer would.
        queue.enqueue_batch("urgent", [{}] * len(jobs), priority="critical")
        time.sleep(0.02)

    assert started_low_after is not None, "the low job never started"
    assert BOUND * 0.9 <= started_low_after <= BOUND + 0.5
    assert served["critical"] / (served["critical"] + served["low"]) >= 0.85


def test_without_pressure_the_strict_order_is_untouched(queue: Queue, redis_url: str) -> None:
    queue.configure(QueueConfig(starvation_bound=BOUND))
    worker = ScriptedWorker(redis_url, queue.keys)
    queue.enqueue("report", {}, priority="low")
    queue.enqueue("urgent", {}, priority="critical")
    assert [job.priority for job in worker.claim(2).jobs] == ["critical", "low"]
