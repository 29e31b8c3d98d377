"""``conveyor rate-limit``, ``pause`` and ``resume``: how fast, and whether, a group's jobs
are claimed."""

from __future__ import annotations

import re
from typing import Any

import click
import orjson

from conveyor.cli.params import TEXT, Seconds
from conveyor.cli.root import Context, console, folding_table, pass_ctx

DEFAULT_GROUP = "*"
UNLIMITED = "-"
"""The ``limits`` hash field that holds the default, and the value that exempts a group."""
_SPEC = re.compile(r"([0-9]+):([0-9]+)")
"""A stored limit, ``<count>:<window ms>``, as claim.lua reads it (ASCII digits only)."""


@click.command("rate-limit")
@click.argument("group", type=TEXT, required=False)
# claim.lua reads the count as a Lua number: exact up to 2**53.
@click.argument("count", type=click.IntRange(min=1, max=2**53), required=False)
@click.argument("per", type=Seconds(), required=False)
@click.option("--list", "show", is_flag=True, help="List every stored limit and exit.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="With --list: one JSON object per line instead of a table.",
)
@click.option(
    "--clear",
    is_flag=True,
    help="Remove GROUP's own limit: it follows the default again ('*': remove the default).",
)
@click.option(
    "--unlimited",
    is_flag=True,
    help="Exempt GROUP from the default limit.",
)
@pass_ctx
def rate_limit(
    obj: Context,
    /,
    *,
    group: str | None,
    count: int | None,
    per: float | None,
    show: bool,
    as_json: bool,
    clear: bool,
    unlimited: bool,
) -> None:
    """Allow COUNT jobs of GROUP per PER seconds (GROUP '*' sets the default).

    PER is from 0.001 (Redis counts milliseconds) to a century. A group without a limit of
    its own follows the default; jobs without a group are limited only by a limit set for
    the group '' (the default does not apply to them). A change applies at once, also to a
    group already waiting for its old limit (its rate count starts afresh).

    \b
    conveyor rate-limit acme 10 1        10 jobs of group acme per second
    conveyor rate-limit '*' 100 60       the default: 100 jobs per minute per group
    conveyor rate-limit --unlimited vip  vip ignores the default
    conveyor rate-limit --clear acme     acme follows the default again
    conveyor rate-limit --list [--json]  every stored limit
    """
    modes = [
        name
        for name, on in (("--list", show), ("--clear", clear), ("--unlimited", unlimited))
        if on
    ]
    if len(modes) > 1:
        raise click.UsageError(f"give only one of {', '.join(modes)}")
    if as_json and not show:
        raise click.UsageError("--json goes with --list")
    if show:
        if group is not None:
            raise click.UsageError("--list takes no GROUP")
        _list(obj.queue.rate_limits(), as_json)
        return
    if modes:
        if group is None or count is not None:
            raise click.UsageError(f"{modes[0]} takes one GROUP and nothing else")
        if clear:
            obj.queue.clear_rate_limit(group)
        elif group == DEFAULT_GROUP:
            raise click.UsageError("'*' is the default itself: remove it with --clear '*'")
        else:
            obj.queue.exempt_from_rate_limit(group)
        click.echo(_now_applies(obj.queue.rate_limits(), group))
        return
    if group is None or count is None or per is None:
        raise click.UsageError("give GROUP COUNT PER, or --list, or --clear/--unlimited GROUP")
    obj.queue.set_rate_limit(group, count, per)


def _list(limits: dict[str, str], as_json: bool) -> None:
    groups = sorted(limits, key=lambda group: (group != DEFAULT_GROUP, group))
    if as_json:
        for group in groups:
            click.echo(orjson.dumps({"group": group, **_parse(limits[group])}).decode())
        return
    if not groups:
        click.echo("no rate limits are set")
        return
    table = folding_table("group", "limit")
    for group in groups:
        table.add_row(_shown(group), _describe(group, limits[group]))
    console.print(table)


def _parse(spec: str) -> dict[str, Any]:
    """A stored limit as ``rate-limit --list --json`` shows it."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        return {"count": None, "per": None, "unlimited": spec == UNLIMITED, "stored": spec}
    count, window_ms = (int(part) for part in match.groups())
    return {"count": count, "per": window_ms / 1000, "unlimited": False, "stored": spec}


def _describe(group: str, spec: str) -> str:
    if spec == UNLIMITED:
        return "no limit" if group == DEFAULT_GROUP else "no limit (exempt from the default)"
    parsed = _parse(spec)
    if parsed["count"] is None:
        # claim.lua does arithmetic on what it could not parse: the claim fails.
        return f"unreadable {spec!r:.60} (claims of this group fail)"
    return f"{parsed['count']} per {parsed['per']:g} s"


def _now_applies(limits: dict[str, str], group: str) -> str:
    """What claim.lua now applies to ``group``: its own limit, else (for a named group) the
    default."""
    own = limits.get(group)
    if own is not None:
        return f"{_shown(group)}: {_describe(group, own)}"
    if group == DEFAULT_GROUP:
        return "no default: groups without a limit of their own have none"
    default = limits.get(DEFAULT_GROUP)
    if group == "" or default is None or default == UNLIMITED:
        return f"{_shown(group)}: no limit"
    return f"{_shown(group)}: the default, {_describe(DEFAULT_GROUP, default)}"


def _shown(group: str) -> str:
    if group == DEFAULT_GROUP:
        return "* (default)"
    return group if group else "'' (no group)"


@click.command()
@click.argument("group", type=TEXT)
@pass_ctx
def pause(obj: Context, /, group: str) -> None:
    """Stop claiming GROUP's jobs (they stay queued)."""
    obj.queue.pause_group(group)


@click.command()
@click.argument("group", type=TEXT)
@pass_ctx
def resume(obj: Context, /, group: str) -> None:
    """Claim GROUP's jobs again."""
    obj.queue.resume_group(group)
