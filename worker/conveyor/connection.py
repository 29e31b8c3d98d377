"""Redis clients from a URL: one Redis, or the primary a set of Sentinels names.

redis-py parses ``redis://``, ``rediss://`` and ``unix://`` URLs and follows a
Sentinel-managed primary across failovers (``Sentinel.master_for``), but has no URL for the
latter. Every Conveyor process that builds a client from a URL (``REDIS_URL``) comes here, so
the URL may name either. The Sentinel form is the one redis-sentinel-url, RedisVL and Prefect
read::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?option=value]
    rediss+sentinel://...      TLS to the data nodes and to the sentinels alike

Sentinels listen on 26379 unless a port is given; ``service`` is the name the sentinels
monitor (``sentinel monitor <service> ...``); ``db`` defaults to 0. The user and password are
the data nodes', as in ``redis://``; the options ``sentinel_username`` and
``sentinel_password`` authenticate to sentinels that require it. Every other option is a
redis-py URL option for the data-node connections (``socket_timeout``, ``ssl_cert_reqs``...),
parsed by redis-py itself; options in the URL override those the caller passes, as with
``Redis.from_url``.

Failover itself is redis-py's: each new connection asks the sentinels where the primary is,
and a pool that sees it moved drops its idle connections. Sentinel closes every client
connection of the old primary when it demotes it (with Redis 7, about ten seconds after the
switch), so the next command reconnects to the new primary and callers usually see no error;
a blocking call in progress fails with ``ConnectionError``. The one trace of a failover is
then the WARNING logged here, once per process, when a connection finds the primary moved.
Until that demotion, connections still open to the old primary keep writing there, and those
writes are lost: producers that must not lose an accepted job use ``wait_for_replicas``
(``conveyor.queue.Queue``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.connection import parse_url

from conveyor.errors import ConfigError

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
"""Sentinel URL scheme -> whether it speaks TLS."""
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_PORT = 26379
SENTINEL_TIMEOUT = 5.0
"""Seconds a sentinel has to answer when the caller sets no ``socket_connect_timeout``:
asking where the primary is, is part of connecting."""
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")

log = logging.getLogger(__name__)


class InvalidRedisURL(ConfigError, ValueError):
    """A Redis URL that cannot work; the message shows the URL without its password."""


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    tls: bool
    client_options: dict[str, Any]
    """Data-node connection options from the URL: credentials, db, redis-py options."""
    sentinel_auth: dict[str, str]
    """``username``/``password`` for the sentinels themselves, when the URL gives them."""

    def sentinel_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Connection options for the sentinels, derived from the caller's ``options``."""
        timeout = options.get("socket_connect_timeout") or SENTINEL_TIMEOUT
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            "socket_keepalive": bool(options.get("socket_keepalive", False)),
            **self.sentinel_auth,
        }
        if self.tls:
            # One private CA usually covers the whole set: share the data nodes' TLS options.
            merged = {**options, **self.client_options}
            kwargs.update({k: v for k, v in merged.items() if k.startswith("ssl_")}, ssl=True)
        return kwargs


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def redact(url: str) -> str:
    """``url`` without its password and query (which may hold ``sentinel_password``)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "<not a URL>"
    rest = rest.partition("?")[0].partition("#")[0]
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hosts}" if ":" in userinfo else f"{user}@{hosts}"
    return f"{scheme}://{netloc}{slash}{path}"


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Read a ``redis+sentinel://`` URL (see the module docstring); ``InvalidRedisURL`` names
    what is wrong with it."""

    def invalid(problem: str) -> InvalidRedisURL:
        return InvalidRedisURL(f"invalid Redis Sentinel URL {redact(url)}: {problem}")

    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        raise invalid(f"scheme is not one of {', '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    rest, _, query = rest.partition("#")[0].partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, members = netloc.rpartition("@")
    sentinels = tuple(_member(m, invalid) for m in members.split(","))

    service, _, db_text = path.strip("/").partition("/")
    if not service:
        raise invalid("no service name: add /<name the sentinels monitor> after the hosts")
    if service.isdigit() and not db_text:
        raise invalid(
            f"service name {service!r} looks like a database number; the form is /<service>/<db>"
        )
    if "/" in db_text:
        raise invalid("the path has more than a service name and a database number")
    if db_text and not (db_text.isascii() and db_text.isdigit()):
        raise invalid(f"database {db_text!r} is not a number")
    db = int(db_text or 0)

    pairs = parse_qsl(query, keep_blank_values=True)
    sentinel_auth = {k.removeprefix("sentinel_"): v for k, v in pairs if k in _SENTINEL_AUTH}
    rest_query = urlencode([(k, v) for k, v in pairs if k not in _SENTINEL_AUTH])
    try:
        # redis-py's own reading of its URL options (types, booleans, ssl_cert_reqs...).
        options = parse_url(f"redis://localhost?{rest_query}")  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise invalid(str(exc)) from None
    options.pop("host", None)
    options.setdefault("db", db)
    db = int(options["db"])
    if userinfo:
        username, has_password, password = userinfo.partition(":")
        if username:
            options["username"] = unquote(username)
        if has_password:
            options["password"] = unquote(password)
    tls = SENTINEL_SCHEMES[scheme.lower()]
    if tls:
        options["ssl"] = True
    return SentinelTarget(sentinels, unquote(service), db, tls, options, sentinel_auth)


def _member(text: str, invalid: Callable[[str], InvalidRedisURL]) -> tuple[str, int]:
    host, port_text = text, ""
    if text.startswith("["):  # [IPv6]:port
        host, bracket, after = text[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise invalid(f"sentinel address {text!r} is not [ipv6]:port")
        port_text = after[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not host:
        raise invalid("a sentinel address has no host (empty item in the host list?)")
    if any(c.isspace() or c in ";|" for c in host):
        # 'a:26379; b:26379' would reach DNS as one odd host name, with a baffling error.
        raise invalid(f"sentinel address {text!r}: separate hosts with ',' and no spaces")
    if not port_text:
        return host, SENTINEL_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise invalid(f"sentinel port {port_text!r} of {host} is not a port number")
    return host, int(port_text)


def _check_plain(url: str) -> None:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in PLAIN_SCHEMES:
        raise InvalidRedisURL(
            f"invalid Redis URL {redact(url)}: the scheme must be redis://, rediss://, unix://,"
            " redis+sentinel:// or rediss+sentinel://"
        )


_primaries: dict[tuple[str, frozenset[tuple[str, int]]], Any] = {}
"""(service, sentinels) -> the primary address this process last found there, shared by all
its clients so that a failover is logged once per process, not once per client."""


def _found_primary(pool: Any, address: Any) -> None:
    service: str = pool.service_name
    sentinels = frozenset(
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in pool.sentinel_manager.sentinels
    )
    previous = _primaries.get((service, sentinels))
    _primaries[service, sentinels] = address
    if previous is not None and previous != address:
        log.warning(
            "Redis primary of %s moved from %s:%s to %s:%s (Sentinel failover); following it",
            service,
            *previous,
            *address,
            extra={"event": "redis_primary_changed"},
        )


class _SentinelPool(redis.sentinel.SentinelConnectionPool):
    def get_master_address(self) -> Any:
        address = super().get_master_address()  # type: ignore[no-untyped-call]
        _found_primary(self, address)
        return address


class _AsyncSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool):
    async def get_master_address(self) -> Any:
        address = await super().get_master_address()  # type: ignore[no-untyped-call]
        _found_primary(self, address)
        return address


class _SentinelRedis(redis.Redis):
    """A client of the primary that also closes its connections to the sentinels."""

    sentinel_manager: redis.sentinel.Sentinel | None = None

    def close(self) -> None:
        super().close()
        if self.sentinel_manager is not None:
            self.sentinel_manager.close()


class _AsyncSentinelRedis(redis.asyncio.Redis):
    """A client of the primary that also closes its connections to the sentinels."""

    sentinel_manager: redis.asyncio.sentinel.Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            await self.sentinel_manager.aclose()


def connect(url: str, **options: Any) -> redis.Redis:
    """A synchronous client for ``url``; ``options`` are ``redis.Redis`` keyword arguments."""
    if not is_sentinel_url(url):
        _check_plain(url)
        try:
            return redis.Redis.from_url(url, **options)
        except ValueError as exc:
            raise InvalidRedisURL(f"invalid Redis URL {redact(url)}: {exc}") from None
    target = parse_sentinel_url(url)
    sentinel = redis.sentinel.Sentinel(
        target.sentinels, sentinel_kwargs=target.sentinel_options(options)
    )
    client: _SentinelRedis = sentinel.master_for(
        target.service,
        redis_class=_SentinelRedis,
        connection_pool_class=_SentinelPool,
        **{**options, **target.client_options},
    )
    client.sentinel_manager = sentinel
    return client


def connect_async(url: str, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client for ``url``; ``options`` are ``redis.asyncio.Redis`` keyword
    arguments. Nothing connects before the first command."""
    if not is_sentinel_url(url):
        _check_plain(url)
        try:
            return redis.asyncio.Redis.from_url(url, **options)
        except ValueError as exc:
            raise InvalidRedisURL(f"invalid Redis URL {redact(url)}: {exc}") from None
    target = parse_sentinel_url(url)
    sentinel = redis.asyncio.sentinel.Sentinel(
        target.sentinels, sentinel_kwargs=target.sentinel_options(options)
    )
    client: _AsyncSentinelRedis = sentinel.master_for(
        target.service,
        redis_class=_AsyncSentinelRedis,
        connection_pool_class=_AsyncSentinelPool,
        **{**options, **target.client_options},
    )
    client.sentinel_manager = sentinel
    return client
