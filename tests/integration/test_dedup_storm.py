"""B15: many processes enqueue the same deduplication keys at once, through every path."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
import redis

from conveyor.queue import Queue
from tests.support.invariants import census
from tests.support.producers import Answer, dedup_storm


def storm(redis_url: str, queue: Queue, processes: int, rounds: int) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    producers = [
        ctx.Process(
            target=dedup_storm,
            args=(redis_url, queue.keys.queue, rounds),
            kwargs={"ready": ready, "start": start, "out": out},
        )
        for _ in range(processes)
    ]
    for producer in producers:
        producer.start()
    try:
        for _ in producers:
            ready.get(timeout=60)
        start.set()
        reports = [out.get(timeout=120) for _ in producers]
    finally:
        for producer in producers:
            producer.join(10)
            if producer.is_alive():
                producer.kill()
                producer.join()
    assert [p.exitcode for p in producers] == [0] * processes
    return reports


def check_one_job_per_key(reports: list[Any], queue: Queue, redis_client: redis.Redis) -> None:
    answers: list[Answer] = [a for report_answers, _ in reports for a in report_answers]
    ids = {key: {job_id for k, job_id, _ in answers if k == key} for key in ("k1", "k2")}
    assert [len(ids["k1"]), len(ids["k2"])] == [1, 1], ids
    assert ids["k1"] != ids["k2"]
    assert sum(created for _, _, created in answers) == 2

    found = census(redis_client, queue.keys)
    assert found.records.keys() == ids["k1"] | ids["k2"]
    for key, key_ids in ids.items():
        assert redis_client.hget(queue.keys.job(next(iter(key_ids))), "dk") == key.encode()
    found.assert_sound()

    rejected = len(answers) - 2
    assert sum(deduplicated for _, deduplicated in reports) == rejected


def test_concurrent_producers_get_one_job_per_key_on_every_path(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    reports = storm(redis_url, queue, processes=10, rounds=10)
    check_one_job_per_key(reports, queue, redis_client)


@pytest.mark.slow
def test_twenty_producers_a_hundred_times_each_get_one_job_per_key(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    reports = storm(redis_url, queue, processes=20, rounds=100)
    check_one_job_per_key(reports, queue, redis_client)
