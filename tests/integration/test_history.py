"""Task history in PostgreSQL: every transition stored once, by any number of writers."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
import redis.asyncio
from psycopg import sql

from conveyor.history import GROUP, HistoryWriter, job_attempts, job_history, migrate, state_counts
from conveyor.history.schema import connect, migrations
from conveyor.history.stream import StreamGauge, trim_acknowledged
from conveyor.job import Backoff
from conveyor.local import PostgresServer
from conveyor.queue import Queue
from tests.support.invariants import events as stream_events
from tests.support.scripted import ScriptedWorker


@pytest.fixture
def history_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL."""
    name = f"h{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def writer(
    redis_url: str, queue: Queue, database_url: str, name: str, **options: Any
) -> HistoryWriter:
    client = redis.asyncio.Redis.from_url(redis_url)
    return HistoryWriter(
        client, queue.keys, database_url, name, block=0.05, owns_client=True, **options
    )


async def drain(*writers: HistoryWriter) -> None:
    """Let the writers work side by side until none of them finds anything left."""

    async def until_empty(w: HistoryWriter) -> None:
        while await w.step():
            pass

    try:
        await asyncio.gather(*(until_empty(w) for w in writers))
    finally:
        for w in writers:
            await w.close()


def write_history(redis_url: str, queue: Queue, database_url: str) -> HistoryWriter:
    w = writer(redis_url, queue, database_url, "solo")
    asyncio.run(drain(w))
    return w


def stored_events(database_url: str, queue: Queue) -> list[tuple[int, int, int, str, str]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT entry_ms, entry_seq, position, job_id, kind FROM conveyor.job_event"
            " WHERE queue = %s ORDER BY 1, 2, 3",
            (queue.keys.queue,),
        ).fetchall()


def stream_event_count(redis_client: redis.Redis, queue: Queue) -> int:
    return len(stream_events(redis_client, queue.keys))


def test_every_transition_is_recorded_with_its_time_attempt_and_worker(
    queue: Queue, redis_url: str, history_url: str
) -> None:
    t0 = datetime.now(UTC)
    w1 = ScriptedWorker(redis_url, queue.keys, "w1")
    quick = queue.enqueue("report", {"n": 1}).id
    flaky = queue.enqueue("sync", {}, max_attempts=2, backoff=Backoff(0, 0, jitter=False)).id
    doomed = queue.enqueue("bad", {})
    first = {job.id: job for job in w1.claim(3).jobs}
    w1.ack(first[quick], runtime_ms=12)
    w1.fail(first[flaky], reason="error")
    w1.fail(first[doomed.id], reason="decode_error", permanent=True)
    assert queue.purge([doomed.id]) == 1
    w2 = ScriptedWorker(redis_url, queue.keys, "w2")
    w2.fail(*w2.claim().jobs, reason="timeout")
    assert queue.replay([flaky]).replayed == 1
    w3 = ScriptedWorker(redis_url, queue.keys, "w3")
    w3.hand_back(*w3.claim().jobs)
    w3.ack(*w3.claim().jobs, runtime_ms=5)
    waiting = queue.enqueue("later", delay=60).id
    running = queue.enqueue("long").id
    assert w3.claim_ids() == [running]

    write_history(redis_url, queue, history_url)

    with connect(history_url) as conn:
        events = job_history(conn, flaky, queue.keys.queue)
        attempts = job_attempts(conn, flaky, queue.keys.queue)
        counts = state_counts(
            conn,
            t0 - timedelta(seconds=1),
            datetime.now(UTC) + timedelta(seconds=1),
            queue.keys.queue,
        )
        nothing = state_counts(
            conn, t0 - timedelta(hours=2), t0 - timedelta(hours=1), queue.keys.queue
        )
        quick_events = job_history(conn, quick, queue.keys.queue)
        doomed_events = job_history(conn, doomed.id, queue.keys.queue)
    assert [(e.kind, e.attempt, e.detail, e.worker) for e in events] == [
        ("queued", 0, "", ""),
        ("started", 1, "w1/1", "w1"),
        ("retried", 1, "error:0", "w1"),
        ("started", 2, "w2/1", "w2"),
        ("dead_lettered", 2, "timeout", "w2"),
        ("replayed", 0, "1", ""),
        ("started", 1, "w3/1", "w3"),
        ("handed_back", 1, "drain", "w3"),
        ("started", 1, "w3/2", "w3"),
        ("completed", 1, "5", "w3"),
    ]
    assert all(e.job_type == "sync" and e.priority == "normal" for e in events)
    times = [e.at for e in events]
    assert times == sorted(times)
    assert t0 - timedelta(seconds=1) <= times[0]
    assert [(a.attempt, a.worker, a.outcome, a.outcome_detail) for a in attempts] == [
        (1, "w1", "retried", "error:0"),
        (2, "w2", "dead_lettered", "timeout"),
        (1, "w3", "handed_back", "drain"),
        (1, "w3", "completed", "5"),
    ]
    assert all(a.ended_at is not None and a.ended_at >= a.started_at for a in attempts)
    assert [(e.kind, e.detail) for e in quick_events] == [
        ("queued", ""),
        ("started", "w1/1"),
        ("completed", "12"),
    ]
    assert [(e.kind, e.detail) for e in doomed_events][2:] == [
        ("dead_lettered", "decode_error"),
        ("purged", "manual"),
    ]
    assert {(c.job_type, c.priority, c.state, c.jobs) for c in counts} == {
        ("report", "normal", "completed", 1),
        ("sync", "normal", "completed", 1),
        ("bad", "normal", "purged", 1),
        ("later", "normal", "delayed", 1),
        ("long", "normal", "active", 1),
    }
    assert nothing == []
    with connect(history_url) as conn:
        (unfinished,) = job_attempts(conn, running, queue.keys.queue)
        assert job_history(conn, waiting, queue.keys.queue)[0].detail.startswith("at:")
    assert (unfinished.outcome, unfinished.ended_at) == (None, None)


def _traffic(queue: Queue, redis_url: str, jobs: int) -> None:
    """Many small stream entries: one per enqueue and per ack, one per claim of ten."""
    ids = [queue.enqueue("ping", {"i": i}).id for i in range(jobs)]
    worker = ScriptedWorker(redis_url, queue.keys)
    claimed = []
    while len(claimed) < len(ids):
        claimed += worker.claim(10).jobs
    for job in claimed:
        worker.ack(job)


def test_entries_delivered_twice_are_stored_once(
    queue: Queue, redis_url: str, redis_client: redis.Redis, history_url: str
) -> None:
    _traffic(queue, redis_url, 20)
    first = write_history(redis_url, queue, history_url)
    before = stored_events(history_url, queue)
    redis_client.xgroup_setid(queue.keys.events, GROUP, "0")

    again = write_history(redis_url, queue, history_url)

    assert again.entries_done == first.entries_done == redis_client.xlen(queue.keys.events)
    assert again.rows_inserted == 0
    assert stored_events(history_url, queue) == before
    assert len(before) == stream_event_count(redis_client, queue) == 20 * 3


def test_two_writers_at_once_store_each_event_once(
    queue: Queue, redis_url: str, redis_client: redis.Redis, history_url: str
) -> None:
    _traffic(queue, redis_url, 60)
    a = writer(redis_url, queue, history_url, "a", batch=7)
    b = writer(redis_url, queue, history_url, "b", batch=7)

    asyncio.run(drain(a, b))

    entries = redis_client.xlen(queue.keys.events)
    assert a.entries_done > 0
    assert b.entries_done > 0
    assert a.entries_done + b.entries_done == entries
    assert a.rows_inserted + b.rows_inserted == 60 * 3
    rows = stored_events(history_url, queue)
    assert len(rows) == len(set(rows)) == stream_event_count(redis_client, queue)


def test_a_dead_writers_pending_entries_are_taken_over_after_the_idle_time(
    queue: Queue, redis_url: str, redis_client: redis.Redis, history_url: str
) -> None:
    _traffic(queue, redis_url, 5)
    redis_client.xgroup_create(queue.keys.events, GROUP, "0")
    taken = redis_client.xreadgroup(GROUP, "crashed", {queue.keys.events: ">"})[0][1]
    survivor = writer(redis_url, queue, history_url, "survivor", claim_idle=0.2)

    async def scenario() -> tuple[int, int]:
        early = await survivor.step()  # stream fully delivered; the dead one's still too fresh
        await asyncio.sleep(0.3)
        later = await survivor.step()
        await survivor.close()
        return early, later

    early, later = asyncio.run(scenario())

    assert (early, later) == (0, len(taken))
    assert redis_client.xpending(queue.keys.events, GROUP)["pending"] == 0
    assert len(stored_events(history_url, queue)) == 5 * 3


def test_migrations_run_once_however_many_start_at_once(history_url: str) -> None:
    applied: list[list[int]] = []

    def start() -> None:
        with psycopg.connect(history_url, autocommit=True) as conn:
            applied.append(migrate(conn))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(history_url, autocommit=True) as conn:
        rerun = migrate(conn)
        versions = conn.execute("SELECT version FROM conveyor.schema_version").fetchall()

    shipped = [m.version for m in migrations()]
    assert sorted(v for run in applied for v in run) == shipped == [1, 2]
    assert rerun == []
    assert sorted(v for (v,) in versions) == shipped


def test_trimming_keeps_what_any_consumer_group_still_needs(
    queue: Queue, redis_url: str, redis_client: redis.Redis, history_url: str
) -> None:
    stream = queue.keys.events
    for i in range(10):
        queue.enqueue("ping", {"i": i})
    ids = [entry_id for entry_id, _ in redis_client.xrange(stream)]
    redis_client.xgroup_create(stream, "audit", "0")
    redis_client.xreadgroup("audit", "reader", {stream: ">"}, count=3)
    redis_client.xack(stream, "audit", ids[0], ids[1])
    write_history(redis_url, queue, history_url)

    async def trim() -> int:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await trim_acknowledged(client, stream, approximate=False)
        finally:
            await client.aclose()

    assert asyncio.run(trim()) == 2  # ids[2] is still pending in 'audit'
    assert [e for e, _ in redis_client.xrange(stream)] == ids[2:]
    redis_client.xgroup_destroy(stream, "audit")
    assert asyncio.run(trim()) == 7  # history acknowledged all; the last delivered one stays
    assert [e for e, _ in redis_client.xrange(stream)] == ids[9:]


def test_a_stream_near_its_cap_is_warned_about_once(
    queue: Queue, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue.client.hset(queue.keys.config, "events_max", 10)
    for i in range(8):
        queue.enqueue("ping", {"i": i})
    gauge = StreamGauge(queue.keys)

    async def check_twice() -> list[tuple[int, int]]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return [await gauge.check(client), await gauge.check(client)]
        finally:
            await client.aclose()

    with caplog.at_level("WARNING"):
        assert asyncio.run(check_twice()) == [(8, 10), (8, 10)]
    warnings = [r for r in caplog.records if getattr(r, "event", "") == "history_stream_near_cap"]
    assert len(warnings) == 1


def test_a_malformed_entry_is_skipped_without_blocking_the_ones_behind_it(
    queue: Queue, redis_url: str, redis_client: redis.Redis, history_url: str
) -> None:
    redis_client.xadd(queue.keys.events, {"e": "queued", "d": "not json"})
    redis_client.xadd(queue.keys.events, {"e": "exploded", "d": "[]"})
    job_id = queue.enqueue("ping").id

    write_history(redis_url, queue, history_url)

    assert [row[3] for row in stored_events(history_url, queue)] == [job_id]
    assert redis_client.xpending(queue.keys.events, GROUP)["pending"] == 0


async def entries_done(w: HistoryWriter, n: int) -> None:
    async with asyncio.timeout(5):
        while True:
            if w.entries_done >= n:
                return
            await asyncio.sleep(0.02)


def test_a_writer_recreates_its_group_when_redis_lost_the_stream(
    queue: Queue, redis_url: str, redis_client: redis.Redis, history_url: str
) -> None:
    w = writer(redis_url, queue, history_url, "w", retry_cap=0.1)

    async def scenario() -> None:
        task = asyncio.create_task(w.run())
        await asyncio.to_thread(queue.enqueue, "before")
        await entries_done(w, 1)
        await asyncio.to_thread(redis_client.delete, queue.keys.events)
        await asyncio.to_thread(queue.enqueue, "after")
        await entries_done(w, 2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())

    with connect(history_url) as conn:
        types = conn.execute("SELECT job_type FROM conveyor.job_event ORDER BY at").fetchall()
    assert types == [("before",), ("after",)]
