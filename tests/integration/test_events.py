"""The events stream: every transition of a job, in order, from the script that made it."""

from __future__ import annotations

import time
from typing import Any

import redis

from conveyor.config import QueueConfig
from conveyor.job import Backoff
from conveyor.queue import Queue
from tests.support.invariants import events
from tests.support.scripted import ScriptedWorker


def history(redis_client: redis.Redis, queue: Queue, job_id: str) -> list[tuple[Any, ...]]:
    return [
        (kind, attempt, detail)
        for kind, (event_id, _, _, attempt, detail) in events(redis_client, queue.keys)
        if event_id == job_id
    ]


def test_every_transition_of_a_job_is_recorded_in_order(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    job_id = queue.enqueue(
        "charge", priority="high", max_attempts=2, backoff=Backoff(0, 0, jitter=False)
    ).id
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=50)

    worker.hand_back(*worker.claim().jobs)
    worker.fail(*worker.claim().jobs, reason="error")
    time.sleep(0.01)
    worker.claim()
    time.sleep(0.1)
    worker.recover()  # the second run's lease ran out: its last attempt, so a dead letter
    queue.replay([job_id])
    worker.ack(*worker.claim().jobs, runtime_ms=42)

    prefix = "w1/"
    assert history(redis_client, queue, job_id) == [
        ("queued", 0, ""),
        ("started", 1, prefix + "1"),
        ("handed_back", 1, "drain"),
        ("started", 1, prefix + "2"),
        ("retried", 1, "error:0"),
        ("started", 2, prefix + "3"),
        ("dead_lettered", 2, "worker_lost"),
        ("replayed", 0, "1"),
        ("started", 1, prefix + "4"),
        ("completed", 1, "42"),
    ]
    mine = [event for _, event in events(redis_client, queue.keys) if event[0] == job_id]
    assert all(event[1:3] == ["charge", "high"] for event in mine)


def test_purges_are_recorded_with_their_cause(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.configure(QueueConfig(dead_max=1))
    worker = ScriptedWorker(redis_url, queue.keys)
    first, second, third = (r.id for r in queue.enqueue_batch("t", range(3), max_attempts=1))
    worker.fail(*worker.claim().jobs, permanent=True)
    worker.fail(*worker.claim().jobs, permanent=True)  # pushes the first out
    queue.purge([second])

    assert [kind for kind, _, _ in history(redis_client, queue, first)] == [
        "queued",
        "started",
        "dead_lettered",
        "purged",
    ]
    assert history(redis_client, queue, first)[-1][2] == "retention"
    assert history(redis_client, queue, second)[-1] == ("purged", 1, "manual")
    assert history(redis_client, queue, third) == [("queued", 0, "")]


def test_one_call_writes_one_entry_per_kind_listing_every_job(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.enqueue("before")
    length = redis_client.xlen(queue.keys.events)
    ids = [r.id for r in queue.enqueue_batch("t", range(50), delay=60)]
    assert redis_client.xlen(queue.keys.events) == length + 1
    added = events(redis_client, queue.keys)[1:]
    assert [kind for kind, _ in added] == ["queued"] * 50
    assert [event[0] for _, event in added] == ids
    assert all(event[4].startswith("at:") for _, event in added)
