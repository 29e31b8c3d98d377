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
from conveyor.job import JobInfo


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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per line instead of a table: the table's fields, the full id, and"
    " the last error's message, reason and time.",
)
@pass_ctx
def dlq_list(obj: Context, /, limit: int, as_json: bool, **options: Any) -> None:
    """List dead letters, oldest first.

    The table shows every id in full, even when the terminal is too narrow for the table (its
    lines then wrap). With --json, each line is an object with "id", "type", "class", "group",
    "reason", "attempts", "max_attempts", "died" (ISO 8601, UTC) and, from the last recorded
    attempt, "error", "error_reason" and "error_at" (null when none was recorded).
    """
    letters = obj.queue.dead_letters(limit=limit, **_filter_args(options))
    if as_json:
        for info in letters:
            click.echo(orjson.dumps(_record(info)).decode())
        return
    table = Table()
    # An id is never wrapped or cut: the other columns fold their text instead.
    table.add_column("id", no_wrap=True)
    for column in ("type", "class", "group", "reason", "attempts", "died"):
        table.add_column(column, overflow="fold")
    longest = 0
    for info in letters:
        died = _utc(info.dead_at)
        longest = max(longest, len(info.id))
        table.add_row(
            info.id,
            info.type,
            info.priority,
            info.group,
            info.dead_reason,
            f"{info.attempts}/{info.max_attempts}",
            "-" if died is None else died.strftime("%Y-%m-%d %H:%M:%S"),
        )
    _print_keeping_ids(table, longest)


def _print_keeping_ids(table: Table, id_width: int) -> None:
    """Print ``table`` (first column the ids, no-wrap) without shortening any id.

    Rich fits a table to the console by folding the wrappable columns, and as a last resort
    shrinks every column, ids included. Below the width where folding the others suffices,
    the table is laid out at that width and printed uncropped; the terminal wraps its lines.
    """
    columns = len(table.columns)
    # Each cell has one space of padding either side; the box draws columns + 1 rules. The
    # folding columns need one character each.
    needed = (id_width + 2) + (1 + 2) * (columns - 1) + (columns + 1)
    if console.width >= needed:
        console.print(table)
    else:
        table.width = needed
        console.print(table, crop=False)


def _utc(seconds: float | None) -> datetime | None:
    """A Unix time as a UTC datetime; None when absent or beyond what datetime holds (a
    foreign record may hold anything)."""
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _iso(seconds: float | None) -> str | None:
    moment = _utc(seconds)
    return None if moment is None else moment.isoformat(timespec="milliseconds")


def _record(info: JobInfo) -> dict[str, Any]:
    """One dead letter as ``dlq list --json`` prints it."""
    last = info.errors[-1] if info.errors else {}
    at = last.get("at")
    # Error entries are JSON written by the Lua scripts (``at`` in ms) or by a foreign client.
    error_at = None
    if isinstance(at, int | float) and not isinstance(at, bool):
        error_at = _iso(at / 1000)  # None when NaN, infinite or out of datetime's range
    error = last.get("error")
    reason = last.get("reason")
    return {
        "id": info.id,
        "type": info.type,
        "class": info.priority,
        "group": info.group,
        "reason": info.dead_reason,
        "attempts": info.attempts,
        "max_attempts": info.max_attempts,
        "died": _iso(info.dead_at),
        "error": error if isinstance(error, str) else None,
        "error_reason": reason if isinstance(reason, str) else None,
        "error_at": error_at,
    }


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
