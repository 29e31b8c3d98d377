"""The read-only commands: ``stats`` and ``top`` from Redis, ``history`` from PostgreSQL, and
``schedule list``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from conveyor.cli.params import TEXT, database_url_option
from conveyor.cli.root import Context, console, folding_table, pass_ctx


@click.command()
@pass_ctx
def stats(obj: Context, /) -> None:
    """Backlog per priority class, rate-limited groups and live workers."""
    from conveyor.top import stats_cells
    from conveyor.workers import list_workers

    table = folding_table(
        "class",
        "ready",
        "due delayed",
        "future delayed",
        "in flight",
        "dead",
        "oldest ready",
        "limited groups",
        title=f"queue {obj.queue_name}",
    )
    for row in obj.queue.stats():
        table.add_row(*stats_cells(row))
    console.print(table)
    workers = list_workers(obj.queue.client, obj.queue.keys)
    console.print(
        f"{len(workers)} workers, "
        f"{sum(w.busy for w in workers)}/{sum(w.concurrency for w in workers)} "
        "slots busy"
    )
    paused = obj.queue.paused_groups()
    if paused:
        console.print(f"paused groups: {', '.join(sorted(paused))}")


@click.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Time between refreshes (or snapshots).",
)
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Print N plain snapshots, one per interval, then exit (0: until interrupted)."
    "  [default: live view on a terminal, else 1]",
)
@pass_ctx
def top(obj: Context, /, interval: float, count: int | None) -> None:
    """A live terminal view: backlog per class and what each worker runs (Ctrl-C quits).

    When standard output is not a terminal (piped to head or grep, redirected to a file),
    top prints one plain-text snapshot of the same view and exits; --count asks for more.
    """
    import contextlib

    from conveyor.top import run, snapshots

    if count is None and console.is_terminal:
        with contextlib.suppress(KeyboardInterrupt):
            run(obj.queue, interval)
        return
    with contextlib.suppress(KeyboardInterrupt):
        snapshots(obj.queue, console, interval, 1 if count is None else count)


@click.command()
@click.argument("job_id", required=False, type=TEXT)
@click.option("--summary", is_flag=True, help="Count jobs by type, class and state instead.")
@click.option("--since", type=click.DateTime(), help="Summary start (UTC) [default: --until - 1d].")
@click.option("--until", type=click.DateTime(), help="Summary end (UTC) [default: now].")
@database_url_option
@pass_ctx
def history(
    obj: Context,
    /,
    *,
    job_id: str | None,
    summary: bool,
    since: datetime | None,
    until: datetime | None,
    database_url: str,
) -> None:
    """Every transition of JOB_ID, or (--summary) job counts over a time range."""
    from conveyor.history import connect, job_history, state_counts

    if summary == (job_id is not None):
        raise click.UsageError("give JOB_ID or --summary")
    with connect(database_url) as conn:
        if job_id is not None:
            events = job_history(conn, job_id, obj.queue_name)
            if not events:
                raise click.ClickException(f"no history of job {job_id!r} in {obj.queue_name}")
            table = folding_table(
                "time (UTC)", "event", "attempt", "worker", "detail", title=job_id
            )
            for e in events:
                at = e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                table.add_row(at, e.kind, str(e.attempt or ""), e.worker, e.detail)
        else:
            end = until.replace(tzinfo=UTC) if until else datetime.now(UTC)
            start = since.replace(tzinfo=UTC) if since else _day_before(end)
            title = f"{obj.queue_name}: {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
            table = folding_table("type", "class", "state", "jobs", title=title)
            for row in state_counts(conn, start, end, obj.queue_name):
                table.add_row(row.job_type, row.priority, row.state, str(row.jobs))
    console.print(table)


def _day_before(moment: datetime) -> datetime:
    try:
        return moment - timedelta(days=1)
    except OverflowError:  # --until in the first day of year 1
        return datetime.min.replace(tzinfo=UTC)


@click.group()
def schedule() -> None:
    """Recurring jobs (workers schedule them; see CONVEYOR_SCHEDULES)."""


@schedule.command("list")
@click.option(
    "--file",
    "path",
    envvar="CONVEYOR_SCHEDULES",
    show_envvar=True,
    required=True,
    help="YAML file of schedules.",
)
@pass_ctx
def schedule_list(obj: Context, /, path: str) -> None:
    """Each schedule with its last settled tick and its next one."""
    from conveyor.schedule import from_ms, load_schedules

    schedules = load_schedules(path)
    keys = [obj.queue.keys.schedule(s.name) for s in schedules]
    lasts = obj.queue.client.mget(keys) if keys else []
    now = datetime.now(UTC)
    table = folding_table("name", "cron", "zone", "job type", "catch-up", "last tick", "next tick")
    for s, last in zip(schedules, lasts, strict=True):
        shown = from_ms(int(last)).astimezone(s.zone).isoformat(" ") if last else "-"
        table.add_row(
            s.name,
            s.cron,
            s.timezone,
            s.job_type,
            s.catch_up,
            shown,
            s.next_tick(now).isoformat(" "),
        )
    console.print(table)
