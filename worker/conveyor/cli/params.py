"""Parameter types and checks shared by the commands.

Each turns a value the shell can hand over (any bytes, any length) into a usage error naming
the parameter, rather than a failure deep inside redis-py or psycopg.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import click
import redis.exceptions

from conveyor.connection import InvalidRedisURL, connect, redact
from conveyor.errors import ConfigError
from conveyor.job import MAX_SECONDS
from conveyor.keys import Keyspace

MAX_ERROR = 400
"""Characters of an error message shown; a bad value may be megabytes long."""

if TYPE_CHECKING:
    _TextType = click.ParamType[str, Any]
    _NumberType = click.ParamType[float, Any]
else:  # older click releases have no type parameters on ParamType
    _TextType = _NumberType = click.ParamType


def one_line(message: str, limit: int = MAX_ERROR) -> str:
    """``message`` on one clipped line, without the client reprs redis-py puts in some errors
    (a failed Sentinel lookup quotes every sentinel's connection pool: a thousand characters)."""
    kept: list[str] = []
    depth = 0
    for at, char in enumerate(message):
        if message.startswith("<redis.", at) or (depth and char == "<"):
            depth += 1
        elif depth and char == ">":
            depth -= 1
            if not depth:
                kept.append("<redis client>")
        elif not depth:
            kept.append(char)
    text = " ".join("".join(kept).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Text(_TextType):
    """A string Redis and PostgreSQL can store. Bytes of a command line that are not UTF-8
    reach Python as lone surrogates, which would fail deep inside a client library."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            text.encode()
        except UnicodeEncodeError:
            self.fail(f"{text!r:.60} is not valid UTF-8 text", param, ctx)
        return text


TEXT = Text()


class QueueName(Text):
    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        name = super().convert(value, param, ctx)
        try:
            Keyspace(name)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return name


class RedisURL(_TextType):
    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        url = str(value)
        try:
            url.encode()
            check_redis_url(url)
        except UnicodeEncodeError:
            self.fail(f"{redact(url)!r:.60} is not valid UTF-8 text", param, ctx)
        except ConfigError as exc:
            self.fail(one_line(str(exc)), param, ctx)
        return url


def check_redis_url(url: str) -> None:
    """Raise ``InvalidRedisURL`` for what can be known wrong without connecting. redis-py
    makes connections lazily, so an unknown URL option, a bad TLS flag or a host name no
    resolver can encode would otherwise surface mid-command as a raw TypeError or UnicodeError.
    """
    client = connect(url)
    pools = [client.connection_pool]
    sentinels = getattr(client, "sentinel_manager", None)
    if sentinels is not None:
        pools += [sentinel.connection_pool for sentinel in sentinels.sentinels]
    try:
        for pool in pools:
            options = pool.connection_kwargs
            pool.connection_class(**options)  # builds, does not connect
            if "host" in options:
                str(options["host"]).encode("idna")
            if "path" in options and b"\0" in os.fsencode(options["path"]):
                raise ValueError("the socket path holds a NUL byte")
    except (TypeError, ValueError, redis.exceptions.RedisError) as exc:
        raise InvalidRedisURL(f"invalid Redis URL {redact(url)}: {exc}") from None
    finally:
        client.close()


class Seconds(_NumberType):
    """A duration in seconds: finite, from a millisecond (Redis's unit) to ``MAX_SECONDS``."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except ValueError:
            self.fail(f"{value!r:.40} is not a number", param, ctx)
        if not (math.isfinite(seconds) and 0.001 <= seconds <= MAX_SECONDS):
            self.fail(f"{value!r:.40} is not between 0.001 and {MAX_SECONDS:g} seconds", param, ctx)
        return seconds


def _check_database_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # Neither message quotes the value: it may hold a password.
    if not value.strip():
        # An empty libpq connection string is valid: it means "the local defaults", a surprise.
        raise click.BadParameter("must not be empty", ctx, param)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise click.BadParameter("is not valid UTF-8 text", ctx, param) from None
    return value


database_url_option = click.option(
    "--database-url",
    envvar="DATABASE_URL",
    show_envvar=True,
    required=True,
    callback=_check_database_url,
    help="PostgreSQL holding the task history.",
)
"""``--database-url`` of the commands that need the task history."""
