"""Recurring jobs against real Redis: every tick enqueued exactly once, however many
schedulers run, and catch-up after downtime by policy."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import redis
import redis.asyncio

from conveyor.job import JobInfo
from conveyor.queue import Queue
from conveyor.schedule import Schedule, Scheduler, to_ms
from tests.support.workers import Ledger, Workers

pytest_plugins = ["tests.support.worker_fixtures"]


def scheduled_jobs(queue: Queue, redis_client: redis.Redis) -> list[JobInfo]:
    ids = redis_client.lrange(queue.keys.group("normal", ""), 0, -1)
    return [queue.get_job(job_id.decode()) for job_id in ids]


def tick_of(job: JobInfo) -> datetime:
    return datetime.fromisoformat(job.dedup_key.split("@", 1)[1])


def one_pass(redis_url: str, queue: Queue, schedule: Schedule) -> Scheduler:
    async def run() -> Scheduler:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            scheduler = Scheduler(client, queue.keys, [schedule], grace=5)
            await scheduler.run_once()
            return scheduler
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_five_schedulers_enqueue_every_tick_exactly_once(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    every_second = Schedule("pulse", "* * * * * *", "ping", payload={"from": "cron"})
    schedulers: list[Scheduler] = []

    def run_for(seconds: float) -> None:
        async def run() -> None:
            client = redis.asyncio.Redis.from_url(redis_url)
            scheduler = Scheduler(client, queue.keys, [every_second], max_sleep=0.5)
            schedulers.append(scheduler)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        await scheduler.run()
            finally:
                await client.aclose()

        asyncio.run(run())

    threads = [threading.Thread(target=run_for, args=(3.3,)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    jobs = scheduled_jobs(queue, redis_client)
    ticks = sorted(tick_of(job) for job in jobs)
    assert 3 <= len(ticks) <= 5  # from the tick before the start, none earlier
    assert len(set(ticks)) == len(ticks)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
    assert sum(s.enqueued for s in schedulers) == len(jobs)
    payloads = [(job.type, orjson.loads(job.payload)) for job in jobs]
    assert payloads == [("ping", {"from": "cron"})] * len(jobs)
    last = int(redis_client.get(queue.keys.schedule("pulse")) or 0)
    assert last == to_ms(ticks[-1])


def test_after_downtime_skip_enqueues_nothing_and_once_exactly_one_job(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    yearly = {"cron": "0 0 1 1 *", "job_type": "report"}
    skip = Schedule("yearly-skip", **yearly, catch_up="skip")  # type: ignore[arg-type]
    once = Schedule("yearly-once", **yearly, catch_up="once")  # type: ignore[arg-type]
    long_ago = to_ms(datetime(2001, 1, 1, tzinfo=UTC))
    for schedule in (skip, once):
        redis_client.set(queue.keys.schedule(schedule.name), long_ago)

    one_pass(redis_url, queue, skip)
    first = one_pass(redis_url, queue, once)
    second = one_pass(redis_url, queue, once)

    (job,) = scheduled_jobs(queue, redis_client)
    assert job.dedup_key.startswith("yearly-once@")
    assert (tick_of(job).month, tick_of(job).day, tick_of(job).hour) == (1, 1, 0)
    assert tick_of(job) > datetime.now(UTC) - timedelta(days=366)
    assert (first.enqueued, second.enqueued) == (1, 0)
    assert int(redis_client.get(queue.keys.schedule(skip.name)) or 0) == long_ago


def test_a_new_schedule_records_its_latest_past_tick_without_running_it(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    yearly = Schedule("fresh", "0 0 1 1 *", "report", catch_up="once")

    one_pass(redis_url, queue, yearly)
    one_pass(redis_url, queue, yearly)

    assert scheduled_jobs(queue, redis_client) == []
    settled = int(redis_client.get(queue.keys.schedule("fresh")) or 0)
    assert settled == to_ms(yearly.latest_tick(datetime.now(UTC)))


def test_workers_run_the_schedules_of_their_yaml_file_once_per_tick(
    workers: Workers, tracked: Queue, job_ledger: Ledger, tmp_path: Path
) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text("schedules:\n  - {name: beat, cron: '* * * * * *', job_type: noop}\n")
    workers.start(schedules=path)
    workers.start(schedules=path)

    rows = job_ledger.wait_rows(3, timeout=10)

    jobs = [tracked.get_job(row["job_id"]) for row in rows]
    ticks = sorted(tick_of(job) for job in jobs)
    assert len({row["job_id"] for row in rows}) == len(rows)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
