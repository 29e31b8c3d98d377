"""``conveyor dlq``: list, show, replay and purge dead letters, by id or by filter."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import click
import orjson
from rich.table import Table

from conveyor.cli.params import TEXT
from conveyor.cli.root import Context, console, pass_ctx


@click.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters."""


_filters = [
    click.option("--type", "job_type", type=TEXT, default=None, help="Only this job type."),
    click.option("--group", type=TEXT, default=None, help="Only this group."),
    click.option(
        "--reason", type=TEXT, default=None, help="Only this reason (error, timeout, ...)."
    ),
    click.option("--since", type=click.DateTime(), default=None, help="Dead since (UTC)."),
    click.option("--until", type=click.DateTime(), default=None, help="Dead until (UTC)."),
]


def _with_filters(func: Any) -> Any:
    for option in reversed(_filters):
        func = option(func)
    return func


def _filter_args(options: dict[str, Any]) -> dict[str, Any]:
    out = {k: options[k] for k in ("job_type", "group", "reason") if options.get(k)}
    for name in ("since", "until"):
        if options.get(name):
            out[name] = options[name].replace(tzinfo=UTC).timestamp()
    return out


@dlq.command("list")
@_with_filters
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@pass_ctx
def dlq_list(obj: Context, /, limit: int, **options: Any) -> None:
    """List dead letters, oldest first."""
    table = Table("id", "type", "class", "group", "reason", "attempts", "died")
    for info in obj.queue.dead_letters(limit=limit, **_filter_args(options)):
        died = datetime.fromtimestamp(info.dead_at or 0, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            info.id,
            info.type,
            info.priority,
            info.group,
            info.dead_reason,
            f"{info.attempts}/{info.max_attempts}",
            died,
        )
    console.print(table)


@dlq.command("show")
@click.argument("job_id", type=TEXT)
@pass_ctx
def dlq_show(obj: Context, /, job_id: str) -> None:
    """Show one job with its payload and every attempt's error."""
    import base64

    info = obj.queue.get_job(job_id)
    try:
        payload: Any = orjson.loads(info.payload)
    except orjson.JSONDecodeError:
        payload = {"undecodable_base64": base64.b64encode(info.payload).decode()}
    record = dataclasses.asdict(info) | {"payload": payload}
    click.echo(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())


@dlq.command("replay")
@click.argument("job_ids", nargs=-1, type=TEXT)
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter matching the filters.")
@_with_filters
@pass_ctx
def dlq_replay(obj: Context, /, job_ids: tuple[str, ...], replay_all: bool, **options: Any) -> None:
    """Replay dead letters with a fresh attempt budget."""
    if bool(job_ids) == replay_all:
        raise click.UsageError("give JOB_IDS or --all (with optional filters)")
    queue = obj.queue
    report = queue.replay_all(**_filter_args(options)) if replay_all else queue.replay(job_ids)
    missing = report.missing or []
    click.echo(f"{report.replayed} replayed, {len(missing)} missing, {report.skipped} skipped")
    for job_id in missing:
        click.echo(f"missing: {job_id}")


@dlq.command("purge")
@click.argument("job_ids", nargs=-1, type=TEXT)
@click.option("--all", "purge_all", is_flag=True, help="Every dead letter matching the filters.")
@_with_filters
@pass_ctx
def dlq_purge(obj: Context, /, job_ids: tuple[str, ...], purge_all: bool, **options: Any) -> None:
    """Delete dead letters for good."""
    if bool(job_ids) == purge_all:
        raise click.UsageError("give JOB_IDS or --all (with optional filters)")
    ids = list(job_ids) or [i.id for i in obj.queue.dead_letters(**_filter_args(options))]
    click.echo(f"{obj.queue.purge(ids)} purged")
