"""``conveyor rate-limit``, ``pause`` and ``resume``: how fast, and whether, a group's jobs
are claimed."""

from __future__ import annotations

import click

from conveyor.cli.params import TEXT, Seconds
from conveyor.cli.root import Context, pass_ctx


@click.command("rate-limit")
@click.argument("group", type=TEXT)
# claim.lua reads the count as a Lua number: exact up to 2**53.
@click.argument("count", type=click.IntRange(min=1, max=2**53))
@click.argument("per", type=Seconds())
@pass_ctx
def rate_limit(obj: Context, /, group: str, count: int, per: float) -> None:
    """Allow COUNT jobs of GROUP per PER seconds (GROUP '*' sets the default).

    PER is from 0.001 (Redis counts milliseconds) to a century.
    """
    obj.queue.set_rate_limit(group, count, per)


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
