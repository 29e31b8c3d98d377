"""The ``conveyor`` group: its global options, its error handling, and what every command gets.

The global options are checked after the subcommand has parsed its arguments, so that its
``--help`` answers first: click parses the group before the subcommand, and checking them there
made even ``conveyor worker --help`` fail under a malformed REDIS_URL.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, wraps
from typing import Any, Concatenate, ParamSpec, TypeVar

import click
import redis.exceptions
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from conveyor.cli.params import QueueName, RedisURL, one_line
from conveyor.connection import connect
from conveyor.errors import ConveyorError, translate_redis_error
from conveyor.queue import Queue

console = Console()
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 60.0
"""Seconds a command waits to connect to Redis, and for each reply (the slowest is one chunk
of 10,000 jobs)."""


def folding_table(*headers: str, title: str | None = None) -> Table:
    """A table whose cells fold onto more lines when the console is narrow: rich's default
    cuts them short with an ellipsis, and a cut job id, worker or schedule name is useless."""
    table = Table(title=title)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


P = ParamSpec("P")
R = TypeVar("R")


class Context:
    """The global options of one command line and the queue they name.

    The options are checked once the whole command line is parsed, before a command that
    takes this context runs (``pass_ctx``), or when first read: a malformed value is a usage
    error naming the option (exit code 2).
    """

    def __init__(self, ctx: click.Context) -> None:
        self._ctx = ctx
        self._options: dict[str, str] | None = None

    def options(self) -> dict[str, str]:
        """Every global option by name, converted and checked by its parameter type."""
        if self._options is None:
            ctx = self._ctx
            self._options = {
                param.name: param.type.convert(ctx.params[param.name], param, ctx)
                for param in ctx.command.params
                if isinstance(param, _Deferred) and param.name
            }
        return self._options

    def given(self, name: str) -> bool:
        """Whether global option ``name`` was set (on the command line or in the environment)."""
        return self._ctx.get_parameter_source(name) != ParameterSource.DEFAULT

    @property
    def redis_url(self) -> str:
        return self.options()["redis_url"]

    @property
    def queue_name(self) -> str:
        return self.options()["queue"]

    @cached_property
    def queue(self) -> Queue:
        # Without timeouts a stalled server, or rediss:// to a plain port (each side waits for
        # the other's first bytes), hangs a command forever. The URL's own socket_timeout
        # options, when given, win.
        client = connect(
            self.redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            health_check_interval=30,
        )
        return Queue(client, self.queue_name)


def pass_ctx(command: Callable[Concatenate[Context, P], R]) -> Callable[P, R]:
    """Hands a command the ``Context`` as its first argument, its options already checked."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        obj: Context = click.get_current_context().find_root().obj
        obj.options()
        return command(obj, *args, **kwargs)

    return run


class _Deferred(click.Option):
    """A global option whose value reaches ``main`` unchecked; ``Context`` converts it."""

    def type_cast_value(self, ctx: click.Context, value: Any) -> Any:
        return value


class Group(click.Group):
    """Turns Conveyor's errors into one readable line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConveyorError as exc:
            raise click.ClickException(one_line(f"{type(exc).__name__}: {exc}")) from exc
        except click.UsageError:
            raise
        except click.ClickException as exc:
            # Messages quote what the user gave (a job id, a line), which may hold newlines.
            raise click.ClickException(one_line(exc.format_message())) from exc
        except redis.exceptions.RedisError as exc:
            # Raw client calls (the worker list, schedules) are not wrapped by Queue.
            error = translate_redis_error(exc, ctx.invoked_subcommand or "command")
            raise click.ClickException(one_line(f"{type(error).__name__}: {error}")) from exc


@click.group(cls=Group)
@click.option(
    "--redis-url",
    cls=_Deferred,
    type=RedisURL(),
    envvar="REDIS_URL",
    default="redis://127.0.0.1:6379/0",
    show_envvar=True,
    show_default=True,
    help="Redis to use: redis://, rediss://, unix:// or redis+sentinel:// (checked before use).",
)
@click.option(
    "--queue",
    cls=_Deferred,
    type=QueueName(),
    envvar="CONVEYOR_QUEUE",
    default="default",
    show_envvar=True,
    show_default=True,
    help="Queue name: no spaces, ':', '{' or '}'.",
)
@click.pass_context
def main(ctx: click.Context, redis_url: str, queue: str) -> None:
    """Conveyor: a distributed task queue on Redis."""
    # Both values stay unchecked in ctx.params until a command asks Context for them.
    ctx.obj = Context(ctx)
