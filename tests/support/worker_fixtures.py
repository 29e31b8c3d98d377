"""Fixtures of the worker-process tiers; test modules load them with
``pytest_plugins = ["tests.support.worker_fixtures"]`` (see ``tests.support.workers``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from conveyor.config import QueueConfig
from conveyor.local import RedisServer
from conveyor.queue import Queue
from tests.support.workers import Ledger, Workers, worker_pool


@pytest.fixture
def job_ledger(redis_url: str, queue_name: str) -> Iterator[Ledger]:
    ledger = Ledger.at(redis_url, f"ledger:{queue_name}")
    yield ledger
    ledger.client.delete(ledger.name)
    ledger.close()


@pytest.fixture
def workers(
    redis_url: str, queue_name: str, job_ledger: Ledger, tmp_path: Path
) -> Iterator[Workers]:
    with worker_pool(redis_url, queue_name, job_ledger.name, tmp_path) as pool:
        yield pool


@pytest.fixture
def tracked(queue: Queue) -> Queue:
    """The test's queue, keeping finished job records for an hour so the census sees them."""
    queue.configure(QueueConfig(done_retention=3600))
    return queue


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may stop and restart; AOF keeps the queue across the restart."""
    server = RedisServer(appendonly=True).start()
    yield server
    server.cleanup()


@pytest.fixture
def own_queue(own_redis: RedisServer, queue_name: str) -> Iterator[Queue]:
    """A queue on ``own_redis`` that keeps finished job records for an hour."""
    client = redis.Redis(port=own_redis.port)
    queue = Queue(client, queue_name)
    queue.configure(QueueConfig(done_retention=3600))
    yield queue
    client.close()
