"""A PostgreSQL outage delays the history and loses none of it.

The test stops its own PostgreSQL server (not the session's) while jobs keep running, then
starts it again on the same data directory and port.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator

import psycopg
import pytest
import redis
import redis.asyncio

from conveyor import local
from conveyor.history import HistoryWriter
from conveyor.history.events import entry_rows, parse_entry_id
from conveyor.local import PostgresServer
from conveyor.queue import Queue
from tests.support.scripted import ScriptedWorker


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.cleanup()


def restart(server: PostgresServer) -> None:
    """Start a stopped server again with the options ``PostgresServer.start`` gives it."""
    data = server.directory / "data"
    server._run(
        local._binary("pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(server.directory / "pg.log"),
        "-w",
        "-o",
        f"-p {server.port} -c listen_addresses=127.0.0.1 -k {server.directory} -c fsync=off",
        "start",
    )


def run_jobs(queue: Queue, redis_url: str, n: int) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    for i in range(n):
        queue.enqueue("ping", {"i": i})
    for job in worker.claim(n).jobs:
        worker.ack(job)


def expected_rows(redis_client: redis.Redis, queue: Queue) -> set[tuple[int, int, int, str, str]]:
    return {
        (row[1], row[2], row[3], row[6], row[5])
        for entry_id, fields in redis_client.xrange(queue.keys.events)
        for row in entry_rows(queue.keys.queue, entry_id, fields)
    }


def unacknowledged(redis_client: redis.Redis, queue: Queue) -> set[tuple[int, int]]:
    """Entry ids the history group has not acknowledged: pending, or not yet delivered."""
    stream = queue.keys.events
    (group,) = redis_client.xinfo_groups(stream)
    delivered = parse_entry_id(group["last-delivered-id"])
    pending = redis_client.xpending_range(stream, "history", "-", "+", 100_000)
    ids = {parse_entry_id(entry_id) for entry_id, _ in redis_client.xrange(stream)}
    return {i for i in ids if i > delivered} | {parse_entry_id(p["message_id"]) for p in pending}


async def stored_rows(url: str) -> set[tuple[int, int, int, str, str]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT entry_ms, entry_seq, position, job_id, kind FROM conveyor.job_event"
        )
        return set(await cur.fetchall())


async def until(condition: Callable[[], Awaitable[bool]], seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.05)


def test_history_catches_up_completely_after_postgres_comes_back(
    queue: Queue,
    redis_url: str,
    redis_client: redis.Redis,
    own_postgres: PostgresServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor.history")
    writer = HistoryWriter(
        redis.asyncio.Redis.from_url(redis_url),
        queue.keys,
        own_postgres.url,
        "w",
        block=0.05,
        retry_cap=0.3,
        maintenance_interval=0.1,
        owns_client=True,
    )

    async def scenario() -> tuple[set[tuple[int, int, int, str, str]], int, int]:
        task = asyncio.create_task(writer.run())
        await asyncio.to_thread(run_jobs, queue, redis_url, 5)
        before = expected_rows(redis_client, queue)

        async def stored_before() -> bool:
            # The writer creates its schema when it starts; until then nothing is stored yet.
            try:
                return await stored_rows(own_postgres.url) == before
            except psycopg.errors.UndefinedTable:
                return False

        await until(stored_before, 10)
        await asyncio.to_thread(own_postgres.stop)
        done_at_stop = writer.entries_done
        await asyncio.to_thread(run_jobs, queue, redis_url, 40)
        expected = expected_rows(redis_client, queue)
        await asyncio.sleep(1.5)  # several retries, all failing
        done_while_down = writer.entries_done - done_at_stop
        unacknowledged_while_down = unacknowledged(redis_client, queue)
        await asyncio.to_thread(restart, own_postgres)

        async def caught_up() -> bool:
            return await stored_rows(own_postgres.url) == expected

        await until(caught_up, 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        new_entries = {(ms, seq) for ms, seq, *_ in expected - before}
        return expected, done_while_down, new_entries - unacknowledged_while_down

    expected, done_while_down, acknowledged_while_down = asyncio.run(scenario())

    assert done_while_down == 0
    assert acknowledged_while_down == set()
    outages = [r for r in caplog.records if getattr(r, "event", "") == "history_unavailable"]
    resumed = [r for r in caplog.records if getattr(r, "event", "") == "history_resumed"]
    assert [r.levelname for r in outages] == ["WARNING"]
    assert len(resumed) == 1
    assert redis_client.xpending(queue.keys.events, "history")["pending"] == 0
    assert len(expected) == 45 * 3
