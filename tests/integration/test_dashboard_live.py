"""The dashboard's live side on a real server: the event stream, wait figures, history panel,
and coexistence with the history writer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import orjson
import psycopg
import pytest
import redis
import redis.asyncio
import uvicorn
from psycopg import sql
from starlette.testclient import TestClient

from conveyor.dashboard import DashboardSettings, create_app
from conveyor.dashboard.feed import SUBSCRIBER_BACKLOG, Hub
from conveyor.history import GROUP, HistoryWriter
from conveyor.local import PostgresServer, free_port
from conveyor.queue import Queue
from tests.support.scripted import ScriptedWorker

TOKEN = "integration-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def settings_for(redis_url: str, queue: Queue, **extra: Any) -> DashboardSettings:
    return DashboardSettings(
        token=TOKEN, redis_url=redis_url, queue=queue.keys.queue, poll_interval=0.5, **extra
    )


@contextlib.contextmanager
def served(settings: DashboardSettings) -> Iterator[str]:
    """The dashboard under uvicorn on a free loopback port, in a thread of this process."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "dashboard did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def messages(response: httpx2.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) of each server-sent event; pings (comments) are skipped."""
    event = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, orjson.loads(line[6:])


@pytest.fixture
def history_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"d{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_the_event_stream_shows_an_enqueue_in_under_a_second(redis_url: str, queue: Queue) -> None:
    with (
        served(settings_for(redis_url, queue)) as base,
        httpx2.Client(base_url=base, headers=BEARER, timeout=5) as client,
        client.stream("GET", "/api/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = messages(response)
        first_event, first = next(stream)
        assert first_event == "stats"
        assert first["redis_up"] is True
        assert "charts" in first

        enqueued_at = time.monotonic()
        job_id = queue.enqueue("email", {"to": "ada"}, priority="high").id
        seen_event = seen_depth = None
        for event, data in stream:
            if event == "events" and any(e["id"] == job_id for e in data["events"]):
                seen_event = time.monotonic() - enqueued_at
                assert data["totals"]["high"]["queued"] == 1
            if event == "stats" and seen_event is not None:
                high = next(c for c in data["classes"] if c["priority"] == "high")
                if high["ready"] == 1:
                    seen_depth = time.monotonic() - enqueued_at
                    break
        print(f"event after {seen_event:.3f}s, depth after {seen_depth:.3f}s")
        assert seen_event is not None
        assert seen_depth is not None
        assert seen_depth < 1.0


def test_throughput_failures_and_waits_come_from_the_event_stream(
    redis_url: str, queue: Queue
) -> None:
    with TestClient(create_app(settings_for(redis_url, queue))) as client:
        time.sleep(0.3)  # the feed reads from '$': let it start before the jobs exist
        queue.enqueue_batch("email", range(4), priority="normal")
        time.sleep(0.4)
        worker = ScriptedWorker(redis_url, queue.keys)
        jobs = worker.claim(4, classes=("normal",)).jobs
        worker.ack(*jobs[:3])
        worker.fail(jobs[3], permanent=True)

        # Rates are recomputed once a second, so they may trail the totals by that much.
        deadline = time.monotonic() + 5
        while True:
            overview = client.get("/api/overview", headers=BEARER).json()
            figures = overview["classes"][2]
            if figures["failure_rate"] and figures["throughput"] * 60 >= 3:
                break
            assert time.monotonic() < deadline, overview
            time.sleep(0.1)
        assert figures["priority"] == "normal"
        assert figures["wait_samples"] == 4
        assert 0.4 <= figures["wait_p50"] < 5
        assert figures["wait_p50"] <= figures["wait_p90"] <= figures["wait_p99"]
        assert figures["failure_rate"] == pytest.approx(0.25)
        assert figures["throughput"] == pytest.approx(3 / 60)
        assert overview["totals"]["normal"] == {
            "queued": 4,
            "started": 4,
            "completed": 3,
            "dead_lettered": 1,
        }
        assert sum(overview["charts"]["throughput"]["completed"]) == 3


def test_an_unreachable_redis_is_reported_not_fatal(queue: Queue) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(settings_for(nowhere, queue))) as client:
        deadline = time.monotonic() + 5
        while (overview := client.get("/api/overview", headers=BEARER).json())["error"] in (
            "starting",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert overview["redis_up"] is False
        assert "unreachable" in overview["error"].lower() or "refused" in overview["error"]


def test_job_panel_shows_the_history_and_the_history_writer_keeps_its_stream(
    redis_url: str, queue: Queue, history_url: str
) -> None:
    settings = settings_for(redis_url, queue, database_url=history_url)
    with TestClient(create_app(settings)) as client:
        time.sleep(0.3)
        job_id = queue.enqueue("email", {"to": "ada"}).id
        worker = ScriptedWorker(redis_url, queue.keys)
        [job] = worker.claim(1).jobs
        worker.fail(job, permanent=True)
        queue.replay([job_id])
        asyncio.run(write_history(redis_url, queue, history_url))

        panel = client.get(f"/api/jobs/{job_id}", headers=BEARER).json()
        assert panel["history"]["available"] is True
        kinds = [e["kind"] for e in panel["history"]["events"]]
        assert kinds == ["queued", "started", "dead_lettered", "replayed"]
        assert panel["history"]["attempts"][0]["outcome"] == "dead_lettered"
        assert panel["job"]["state"] == "queued"

        # The dashboard reads without a consumer group: the writer's group is the only one,
        # and it has everything acknowledged.
        groups = redis.Redis.from_url(redis_url).xinfo_groups(queue.keys.events)
        assert [g["name"].decode() for g in groups] == [GROUP]
        assert groups[0]["pending"] == 0


async def write_history(redis_url: str, queue: Queue, database_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    writer = HistoryWriter(client, queue.keys, database_url, "solo", block=0.05, owns_client=True)
    try:
        while await writer.step():
            pass
    finally:
        await writer.close()


def test_a_page_that_falls_behind_is_cut_off_instead_of_buffered() -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        hub = Hub()
        slow, fast = hub.subscribe(), hub.subscribe()
        for n in range(SUBSCRIBER_BACKLOG + 5):
            hub.publish({"n": n})
            if not fast.empty():
                await fast.get()
        drained = [slow.get_nowait() for _ in range(slow.qsize())]
        return drained, list(hub.subscribers)

    drained, still = asyncio.run(scenario())
    assert len(drained) == SUBSCRIBER_BACKLOG
    assert drained[-1] is None  # the end mark: the page's EventSource reconnects afresh
    assert len(still) == 1
