"""Enqueue: deduplication on every path (B15), batches in one round trip, ids, payload size and
memory (B25), and finished jobs leaving Redis."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
import redis.asyncio
from prometheus_client import REGISTRY

from conveyor.config import QueueConfig
from conveyor.errors import InvalidJob, PayloadTooLarge
from conveyor.job import Backoff, JobSpec
from conveyor.queue import AsyncQueue, Enqueued, Queue
from tests.support.invariants import census, snapshot
from tests.support.scripted import ScriptedWorker


def refused_total(job_type: str) -> float:
    value = REGISTRY.get_sample_value("conveyor_jobs_refused_total", {"job_type": job_type})
    return value or 0.0


def live_jobs_with_key(redis_client: redis.Redis, queue: Queue, key: str) -> list[str]:
    found = census(redis_client, queue.keys)
    return sorted(
        job_id
        for job_id in found.records
        if redis_client.hget(queue.keys.job(job_id), "dk") == key.encode()
    )


def test_a_dedup_key_returns_the_first_id_on_every_enqueue_path(
    queue: Queue, redis_client: redis.Redis
) -> None:
    first = queue.enqueue("t", {"v": 1}, dedup_key="k1")
    assert first.created
    later = datetime.now(UTC) + timedelta(minutes=5)
    answers = [
        queue.enqueue("t", {"v": 2}, dedup_key="k1"),
        queue.enqueue("t", {"v": 3}, dedup_key="k1", delay=5),
        queue.enqueue("t", {"v": 4}, dedup_key="k1", run_at=later),
        queue.enqueue("other-type", {"v": 5}, dedup_key="k1", priority="critical"),
        *queue.enqueue_batch("t", [{"v": 6}, {"v": 7}], dedup_key="k1"),
        *queue.enqueue_many([JobSpec("t", {"v": 8}, dedup_key="k1", group="g")]),
    ]
    assert [(a.id, a.created) for a in answers] == [(first.id, False)] * len(answers)
    assert live_jobs_with_key(redis_client, queue, "k1") == [first.id]
    assert redis_client.hget(queue.keys.job(first.id), "p") == b'{"v":1}'
    census(redis_client, queue.keys).assert_sound()


def test_the_asyncio_producer_shares_the_same_keys(queue: Queue, redis_url: str) -> None:
    first = queue.enqueue("t", dedup_key="k")

    async def produce() -> list[Enqueued]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            producer = AsyncQueue(client, queue.keys.queue)
            single = await producer.enqueue("t", dedup_key="k")
            return [single, *await producer.enqueue_batch("t", [1, 2], dedup_key="k")]
        finally:
            await client.aclose()

    assert [(r.id, r.created) for r in asyncio.run(produce())] == [(first.id, False)] * 3


def test_duplicates_inside_one_batch_get_the_first_jobs_id(
    queue: Queue, redis_client: redis.Redis
) -> None:
    results = queue.enqueue_many(
        [
            JobSpec("t", 1, dedup_key="a"),
            JobSpec("t", 2, dedup_key="b"),
            JobSpec("t", 3, dedup_key="a"),
            JobSpec("t", 4, dedup_key="a", delay=10),
            JobSpec("t", 5),
            JobSpec("t", 6),
        ]
    )
    ids = [r.id for r in results]
    assert [r.created for r in results] == [True, True, False, False, True, True]
    assert ids[2] == ids[3] == ids[0]
    assert len(set(ids)) == 4
    assert len(census(redis_client, queue.keys).records) == 4


def test_a_delayed_first_job_holds_its_key_for_immediate_ones_too(queue: Queue) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    first = queue.enqueue("t", dedup_key="k", run_at=later)
    assert queue.enqueue("t", dedup_key="k").id == first.id
    assert queue.get_job(first.id).state == "delayed"


def test_after_the_window_the_same_key_makes_a_new_job(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    first = queue.enqueue("t", dedup_key="k", dedup_window=0.2)
    assert queue.enqueue("t", dedup_key="k", dedup_window=0.2).id == first.id
    time.sleep(0.3)
    second = queue.enqueue("t", dedup_key="k", dedup_window=0.2)
    assert second.created
    assert second.id != first.id
    assert live_jobs_with_key(redis_client, queue, "k") == sorted([first.id, second.id])


def test_the_window_outlives_the_job_itself(queue: Queue, redis_url: str) -> None:
    first = queue.enqueue("t", dedup_key="k")
    worker = ScriptedWorker(redis_url, queue.keys)
    worker.ack(*worker.claim().jobs)
    again = queue.enqueue("t", dedup_key="k")
    assert (again.id, again.created) == (first.id, False)


def test_ten_thousand_jobs_are_enqueued_in_one_round_trip(
    queue: Queue, redis_client: redis.Redis
) -> None:
    queue.enqueue("warm-up")  # loads the functions, so no reload is counted below

    def calls() -> dict[str, int]:
        stats = redis_client.info("commandstats")
        return {
            name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
            for name in ("fcall", "function|load")
        }

    before = calls()
    results = queue.enqueue_batch("bulk", ({"i": i} for i in range(10_000)), group="g")
    after = calls()
    assert {name: after[name] - before[name] for name in after} == {"fcall": 1, "function|load": 0}

    ids = [r.id for r in results]
    assert len(set(ids)) == 10_000
    assert sorted(ids) == ids
    assert all(r.created for r in results)
    assert queue.stats(["normal"])[0].ready == 10_001


def test_ids_sort_by_creation_across_calls_and_a_sequence_rollover(
    queue: Queue, redis_client: redis.Redis
) -> None:
    ids = [queue.enqueue("t").id for _ in range(5)]
    # Push the id counter to just below a million, where a suffix modulo 10**6 would wrap.
    redis_client.set(queue.keys.base + "seq", 999_995)
    ids += [r.id for r in queue.enqueue_batch("t", range(10))]
    ids += [queue.enqueue("t").id for _ in range(5)]
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids


def test_an_oversized_payload_is_refused_and_nothing_is_stored(
    queue: Queue, redis_client: redis.Redis
) -> None:
    """B25: 1.1 MB of random bytes (as base64 text) against the 512 KiB default."""
    queue.enqueue("first")
    before = snapshot(redis_client, queue.keys)
    count = refused_total("pdf")
    blob = base64.b64encode(os.urandom(1_100_000)).decode()
    with pytest.raises(PayloadTooLarge) as error:
        queue.enqueue("pdf", {"file": blob})
    assert error.value.limit == 512 * 1024
    with pytest.raises(PayloadTooLarge):
        queue.enqueue_batch("pdf", [{"ok": 1}, {"file": blob}])
    assert refused_total("pdf") == count + 2
    assert snapshot(redis_client, queue.keys) == before


@pytest.mark.parametrize("priority", [50, -1, "urgent"])
def test_an_invalid_priority_stores_nothing(
    queue: Queue, redis_client: redis.Redis, priority: object
) -> None:
    """B21 (c), against a real Redis: the refusal happens before any key is written."""
    queue.enqueue("first")
    before = snapshot(redis_client, queue.keys)
    with pytest.raises(InvalidJob):
        queue.enqueue("t", {}, priority=priority)
    with pytest.raises(InvalidJob):
        queue.enqueue_many([JobSpec("t"), JobSpec("t", priority=priority)])  # type: ignore[arg-type]
    assert snapshot(redis_client, queue.keys) == before


def test_a_large_payload_under_a_raised_limit_costs_little_more_than_its_size(
    redis_client: redis.Redis, queue_name: str
) -> None:
    """B25: the record of a 1.1 MB document stays within 1.5 times the payload's size."""
    queue = Queue(redis_client, queue_name, max_payload=4 * 1024 * 1024)
    blob = base64.b64encode(os.urandom(1_100_000)).decode()
    job_id = queue.enqueue("pdf", {"file": blob}).id
    used = redis_client.memory_usage(queue.keys.job(job_id), samples=0)
    assert used is not None
    assert used <= 1.5 * len(blob)
    assert queue.get_job(job_id).payload == b'{"file":"' + blob.encode() + b'"}'


def test_a_finished_job_leaves_nothing_in_redis(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    ids = [r.id for r in queue.enqueue_batch("t", range(3), max_attempts=3)]
    worker = ScriptedWorker(redis_url, queue.keys)
    worker.fail(*worker.claim(3).jobs, backoff_base_ms=0)  # leaves an error history to delete
    time.sleep(0.01)
    jobs = worker.claim(3).jobs
    assert len(jobs) == 3
    assert worker.ack(*jobs) == []
    for job_id in ids:
        assert not redis_client.exists(queue.keys.job(job_id), queue.keys.errors(job_id))
    assert census(redis_client, queue.keys).placed == set()
    [stats] = queue.stats(["normal"])
    assert (stats.ready, stats.in_flight, stats.due_delayed, stats.dead) == (0, 0, 0, 0)


def test_with_retention_a_finished_job_is_kept_then_expires(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.configure(QueueConfig(done_retention=0.3))
    job_id = queue.enqueue("t", backoff=Backoff(0, 0)).id
    worker = ScriptedWorker(redis_url, queue.keys)
    worker.fail(*worker.claim().jobs)
    time.sleep(0.01)
    worker.ack(*worker.claim().jobs)

    info = queue.get_job(job_id)
    assert info.state == "done"
    assert len(info.errors) == 1
    for key in (queue.keys.job(job_id), queue.keys.errors(job_id)):
        assert 0 < redis_client.pttl(key) <= 300
    assert census(redis_client, queue.keys).states["done"] == {job_id}
    time.sleep(0.4)
    assert not redis_client.exists(queue.keys.job(job_id), queue.keys.errors(job_id))


def test_a_server_that_lost_the_functions_gets_them_back_on_the_next_call(
    queue: Queue, redis_client: redis.Redis, redis_url: str
) -> None:
    """A Redis restarted without persistence, or FUNCTION FLUSH: every path loads the library
    again by itself, the worker's one-trip wait included."""
    queue.enqueue("t", 1)
    redis_client.function_flush()
    assert queue.enqueue("t", 2).created
    redis_client.function_flush()
    worker = ScriptedWorker(redis_url, queue.keys)
    assert [job.payload for job in worker.claim(10).jobs] == [b"1", b"2"]
    redis_client.function_flush()
    assert queue.stats(["normal"])[0].in_flight == 2
