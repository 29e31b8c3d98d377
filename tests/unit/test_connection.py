"""Redis URLs, Sentinel form included: what each part means, and errors that keep secrets."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from conveyor.connection import (
    SENTINEL_TIMEOUT,
    InvalidRedisURL,
    connect,
    connect_async,
    parse_sentinel_url,
    redact,
)
from conveyor.errors import ConfigError

SECRET = "s3cr%40t"


def test_a_sentinel_url_names_sentinels_service_database_and_credentials() -> None:
    target = parse_sentinel_url(
        f"redis+sentinel://app:{SECRET}@s1:26380,s2,10.0.0.3:5000/orders/3"
        "?socket_timeout=2.5&health_check_interval=7&sentinel_password=sp"
    )

    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("10.0.0.3", 5000))
    assert (target.service, target.db, target.tls) == ("orders", 3, False)
    assert target.client_options == {
        "username": "app",
        "password": "s3cr@t",
        "db": 3,
        "socket_timeout": 2.5,
        "health_check_interval": 7,
    }
    assert target.sentinel_auth == {"password": "sp"}


def test_the_database_defaults_to_zero_and_a_password_alone_is_the_data_nodes() -> None:
    target = parse_sentinel_url("redis+sentinel://:pw@[::1]:26390,[fe80::2]/mymaster")

    assert target.sentinels == (("::1", 26390), ("fe80::2", 26379))
    assert target.client_options == {"password": "pw", "db": 0}
    assert target.sentinel_auth == {}


def test_a_tls_sentinel_url_uses_tls_for_the_sentinels_too() -> None:
    target = parse_sentinel_url(
        "rediss+sentinel://s1/orders?ssl_cert_reqs=required&sentinel_username=watch"
    )

    assert target.tls
    assert target.client_options["ssl"] is True
    options = target.sentinel_options({"socket_connect_timeout": 2, "ssl_ca_certs": "/ca.pem"})
    assert options == {
        "socket_connect_timeout": 2,
        "socket_timeout": 2,
        "socket_keepalive": False,
        "username": "watch",
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": "/ca.pem",
    }


def test_sentinels_answer_within_the_connect_timeout_or_a_default() -> None:
    target = parse_sentinel_url("redis+sentinel://s1/orders")

    assert target.sentinel_options({})["socket_timeout"] == SENTINEL_TIMEOUT
    options = target.sentinel_options({"socket_timeout": 60, "socket_keepalive": True})
    assert (options["socket_timeout"], options["socket_keepalive"]) == (SENTINEL_TIMEOUT, True)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"redis+sentinel://u:{SECRET}@/orders", "has no host"),
        (f"redis+sentinel://u:{SECRET}@s1,,s2/orders", "has no host"),
        (f"redis+sentinel://u:{SECRET}@s1:http/orders", "port 'http' of s1 is not a port"),
        (f"redis+sentinel://u:{SECRET}@s1:70000/orders", "port '70000' of s1 is not a port"),
        (f"redis+sentinel://u:{SECRET}@[::1/orders", "is not [ipv6]:port"),
        (f"redis+sentinel://u:{SECRET}@s1:26379", "no service name"),
        (f"redis+sentinel://u:{SECRET}@s1/orders/x", "database 'x' is not a number"),
        (f"redis+sentinel://u:{SECRET}@s1/orders/0/1", "more than a service name"),
        (
            f"redis+sentinel://s1/orders?socket_timeout=soon&sentinel_password={SECRET}",
            "'socket_timeout'",
        ),
        (f"http://u:{SECRET}@s1:6379/0", "scheme must be redis://"),
        (f"u:{SECRET}@s1:6379", "scheme must be redis://"),
        (f"redis://u:{SECRET}@s1:port/0", "Port could not be cast"),
    ],
)
def test_an_unusable_url_is_refused_with_its_problem_and_without_its_password(
    url: str, problem: str
) -> None:
    with pytest.raises(InvalidRedisURL) as refused:
        connect(url)

    message = str(refused.value)
    assert problem in message
    assert SECRET not in message
    assert "s3cr@t" not in message
    assert isinstance(refused.value, ValueError)
    assert isinstance(refused.value, ConfigError)


def test_redact_keeps_the_user_and_drops_password_and_query() -> None:
    assert redact("redis://u:pw@h:1/0?password=x") == "redis://u:***@h:1/0"
    assert redact("redis+sentinel://:pw@a,b/svc") == "redis+sentinel://:***@a,b/svc"
    assert redact("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock"


def test_a_plain_url_gives_redis_py_client_with_the_callers_options() -> None:
    client = connect("redis://127.0.0.1:6390/2", socket_timeout=3, health_check_interval=30)

    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"], kwargs["socket_timeout"]) == (6390, 2, 3)
    assert kwargs["health_check_interval"] == 30
    assert not isinstance(client.connection_pool, redis.sentinel.SentinelConnectionPool)
    client.close()


def test_a_sentinel_url_gives_a_client_of_the_named_primary() -> None:
    client = connect(
        "redis+sentinel://:pw@s1:1,s2:2/orders/4?socket_timeout=9",
        socket_timeout=3,
        socket_connect_timeout=1,
    )

    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert (pool.service_name, pool.is_master) == ("orders", True)
    kwargs = pool.connection_kwargs
    # Options in the URL win over the caller's, as with Redis.from_url.
    assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (4, "pw", 9)
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"], s["socket_timeout"]) for s in sentinels] == [
        ("s1", 1, 1),
        ("s2", 2, 1),
    ]
    client.close()


def test_an_async_sentinel_client_closes_its_sentinel_connections_with_its_own() -> None:
    async def scenario() -> None:
        client = connect_async("redis+sentinel://s1,s2/orders", socket_keepalive=True)
        pool = client.connection_pool
        assert isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool)
        assert pool.connection_kwargs["socket_keepalive"] is True
        closed: list[object] = []
        for sentinel in pool.sentinel_manager.sentinels:

            async def aclose(
                sentinel: redis.asyncio.Redis = sentinel, close=sentinel.aclose
            ) -> None:
                closed.append(sentinel)
                await close()

            sentinel.aclose = aclose
        await client.aclose()
        assert closed == pool.sentinel_manager.sentinels

    asyncio.run(scenario())


def test_an_async_plain_client_is_redis_pys_own() -> None:
    async def scenario() -> None:
        client = connect_async("unix:///tmp/none.sock?db=1", socket_timeout=4)
        assert isinstance(client, redis.asyncio.Redis)
        assert client.connection_pool.connection_kwargs["path"] == "/tmp/none.sock"
        await client.aclose()

    asyncio.run(scenario())


def test_a_moved_primary_is_logged_once_per_process_however_many_clients_see_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "redis+sentinel://s1:1,s2:2/moving"
    clients = [connect(url), connect(url), connect("redis+sentinel://s3:3/moving")]
    answer = {"s1": ("10.0.0.1", 6379), "s3": ("10.0.0.9", 6379)}
    for client in clients:
        manager = client.connection_pool.sentinel_manager
        first = manager.sentinels[0].connection_pool.connection_kwargs["host"]
        manager.discover_master = lambda service, first=first: answer[first]

    for client in clients:
        client.connection_pool.get_master_address()
    answer["s1"] = ("10.0.0.2", 6379)
    with caplog.at_level(logging.WARNING, logger="conveyor.connection"):
        for client in clients:
            client.connection_pool.get_master_address()

    # The third client watches another set that happens to use the same service name.
    moved = [r for r in caplog.records if getattr(r, "event", "") == "redis_primary_changed"]
    assert [r.getMessage() for r in moved] == [
        "Redis primary of moving moved from 10.0.0.1:6379 to 10.0.0.2:6379 "
        "(Sentinel failover); following it"
    ]
    for client in clients:
        client.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://127.0.0.1:26379/0", "looks like a database number"),
        ("redis+sentinel://a:26379;b:26379/mymaster", "separate hosts with ','"),
        ("redis+sentinel://a:26379, b:26379/mymaster", "separate hosts with ','"),
    ],
)
def test_sentinel_url_mistakes_a_user_makes_are_named(url: str, problem: str) -> None:
    with pytest.raises(InvalidRedisURL, match=problem):
        parse_sentinel_url(url)
