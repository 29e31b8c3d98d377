"""Fixtures shared by every test tier: private Redis and PostgreSQL servers on loopback.

The servers are real (``conveyor.local`` starts them from the system binaries); nothing here
is a fake. Each test gets a fresh queue name so tests never see each other's keys.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from conveyor.local import PostgresServer, RedisServer
from conveyor.queue import Queue


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture
def queue_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def queue(redis_client: redis.Redis, queue_name: str) -> Queue:
    return Queue(redis_client, queue_name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def database_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url
