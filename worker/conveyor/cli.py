"""The ``conveyor`` command line.

Every option can also come from the environment variable shown in ``--help``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from typing import Any

import click
import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from conveyor.config import WorkerSettings, env_name
from conveyor.errors import ConveyorError
from conveyor.job import Backoff, JobSpec
from conveyor.keys import PRIORITY_CLASSES
from conveyor.queue import Queue

console = Console()
SETTINGS_ENV = "CONVEYOR_SETTINGS_JSON"


class _Context:
    def __init__(self, redis_url: str, queue: str) -> None:
        self.redis_url = redis_url
        self.queue_name = queue
        self._queue: Queue | None = None

    @property
    def queue(self) -> Queue:
        if self._queue is None:
            self._queue = Queue.from_url(self.redis_url, self.queue_name)
        return self._queue


pass_ctx = click.make_pass_decorator(_Context)


class _Group(click.Group):
    """Turns Conveyor's errors into one readable line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConveyorError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@click.group(cls=_Group)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default="redis://127.0.0.1:6379/0",
    show_envvar=True,
    show_default=True,
    help="Redis to use.",
)
@click.option(
    "--queue",
    envvar="CONVEYOR_QUEUE",
    default="default",
    show_envvar=True,
    show_default=True,
    help="Queue name.",
)
@click.pass_context
def main(ctx: click.Context, redis_url: str, queue: str) -> None:
    """Conveyor: a distributed task queue on Redis."""
    ctx.obj = _Context(redis_url, queue)


# -- workers -----------------------------------------------------------------------------------


def _worker_options() -> list[Any]:
    """One CLI option per WorkerSettings field, named and documented from the field."""
    options = []
    skip = {"redis_url", "queue", "import_path"}
    for f in dataclasses.fields(WorkerSettings):
        if f.name in skip:
            continue
        options.append(
            click.Option(
                ["--" + f.name.replace("_", "-")],
                default=None,
                envvar=env_name(f),
                show_envvar=True,
                help=f"{f.metadata['doc']} [default: {_show(f.default)}]",
            )
        )
    return options


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


@click.pass_context
def _worker(ctx: click.Context, /, modules: tuple[str, ...], **options: Any) -> None:
    """Run a supervisor that keeps worker processes running the handlers of MODULES."""
    from conveyor import logs
    from conveyor.supervisor import Supervisor, child_argv

    settings = _settings(ctx.obj, modules, options)
    logs.configure(settings.log_level, settings.log_format)
    if settings.metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Worker processes write their metrics here; the supervisor's endpoint sums them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="conveyor-metrics-")
    payload = dataclasses.asdict(settings)
    os.environ[SETTINGS_ENV] = json.dumps(payload)
    supervisor = Supervisor(child_argv([]), settings.processes, settings.grace)
    if settings.metrics_port:
        from conveyor import health
        from conveyor.metrics import QueueCollector

        queue = Queue.from_url(settings.redis_url, settings.queue)
        health.serve(
            settings.metrics_port,
            supervisor.live,
            supervisor.ready,
            host=settings.metrics_host,
            collectors=[QueueCollector(queue)],
        )
    sys.exit(supervisor.run())


def _settings(obj: _Context, modules: tuple[str, ...], options: dict[str, Any]) -> WorkerSettings:
    env = {k: str(v) for k, v in options.items() if v is not None}
    environ = {
        **os.environ,
        **{env_name(f): env[f.name] for f in dataclasses.fields(WorkerSettings) if f.name in env},
    }
    base = WorkerSettings.from_env(environ)
    return dataclasses.replace(
        base,
        redis_url=obj.redis_url,
        queue=obj.queue_name,
        import_path=tuple(modules) or base.import_path,
    )


main.add_command(
    click.Command(
        "worker",
        callback=_worker,
        params=[click.Argument(["modules"], nargs=-1), *_worker_options()],
        help=_worker.__doc__,
    )
)


@main.command("worker-process", hidden=True)
def worker_process() -> None:
    """One worker process, started by the supervisor with its settings in the environment."""
    from conveyor import logs
    from conveyor.registry import default_registry
    from conveyor.worker import exit_now, run_worker

    raw: dict[str, Any] = json.loads(os.environ[SETTINGS_ENV])
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    settings = WorkerSettings(**fixed)
    logs.configure(settings.log_level, settings.log_format)
    for module in settings.import_path:
        importlib.import_module(module)
    exit_now(run_worker(settings, default_registry))


# -- producing ---------------------------------------------------------------------------------


@main.command()
@click.argument("job_type", required=False)
@click.argument("payload", required=False)
@click.option("--priority", type=click.Choice(PRIORITY_CLASSES), default="normal")
@click.option("--group", default="")
@click.option("--delay", type=float, default=0.0, help="Seconds before the job may run.")
@click.option("--dedup-key", default="")
@click.option("--max-attempts", type=int, default=3)
@click.option("--timeout", type=float, default=300.0, help="Seconds per attempt.")
@click.option(
    "--stdin",
    "from_stdin",
    is_flag=True,
    help='Read JSON lines: {"type": ..., "payload": ..., <JobSpec options>}.',
)
@pass_ctx
def enqueue(
    obj: _Context, /, job_type: str | None, payload: str | None, from_stdin: bool, **options: Any
) -> None:
    """Enqueue a job (PAYLOAD is JSON), or many from standard input."""
    if from_stdin:
        specs = [_spec_from_line(n, line) for n, line in enumerate(sys.stdin, 1) if line.strip()]
        done = 0
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("enqueueing", total=len(specs))
            for start in range(0, len(specs), 5000):
                chunk = specs[start : start + 5000]
                for result in obj.queue.enqueue_many(chunk):
                    done += result.created
                progress.advance(bar, len(chunk))
        console.print(f"{done} enqueued, {len(specs) - done} deduplicated")
        return
    if not job_type:
        raise click.UsageError("give JOB_TYPE (and PAYLOAD), or --stdin")
    try:
        data = orjson.loads(payload) if payload else {}
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"PAYLOAD is not JSON: {exc}") from exc
    result = obj.queue.enqueue(job_type, data, **options)
    click.echo(result.id if result.created else f"{result.id} (deduplicated)")


def _spec_from_line(number: int, line: str) -> JobSpec:
    try:
        record = orjson.loads(line)
        if not isinstance(record, dict) or "type" not in record:
            raise ValueError('each line must be an object with a "type"')
        if "backoff" in record:
            record["backoff"] = Backoff(**record["backoff"])
        if "run_at" in record:
            record["run_at"] = datetime.fromisoformat(record["run_at"])
        job_type = record.pop("type")
        return JobSpec(job_type, record.pop("payload", {}), **record)
    except (ValueError, TypeError, ConveyorError) as exc:
        raise click.ClickException(f"line {number}: {exc}") from exc


# -- inspecting --------------------------------------------------------------------------------


@main.command()
@pass_ctx
def stats(obj: _Context, /) -> None:
    """Backlog per priority class, rate-limited groups and live workers."""
    from conveyor.workers import list_workers

    table = Table(
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
        age = "-" if row.oldest_ready_age is None else f"{row.oldest_ready_age:.1f}s"
        table.add_row(
            row.priority,
            str(row.ready),
            str(row.due_delayed),
            str(row.future_delayed),
            str(row.in_flight),
            str(row.dead),
            age,
            str(row.limited_groups),
        )
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


@main.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True)
@pass_ctx
def top(obj: _Context, /, interval: float) -> None:
    """A live terminal view: backlog per class and what each worker runs (Ctrl-C quits)."""
    import contextlib

    from conveyor.top import run

    with contextlib.suppress(KeyboardInterrupt):
        run(obj.queue, interval)


@main.command()
@click.option("--host", envvar="CONVEYOR_DASHBOARD_HOST", show_envvar=True, default="127.0.0.1")
@click.option("--port", envvar="CONVEYOR_DASHBOARD_PORT", show_envvar=True, default=8089)
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    show_envvar=True,
    default="",
    help="PostgreSQL holding the task history; without it job panels show Redis's record only.",
)
@pass_ctx
def dashboard(obj: _Context, /, host: str, port: int, database_url: str) -> None:
    """Serve the live web dashboard; log in with the token in CONVEYOR_DASHBOARD_TOKEN."""
    from conveyor import logs
    from conveyor.dashboard import DashboardSettings, serve

    settings = DashboardSettings.from_env(
        redis_url=obj.redis_url,
        queue=obj.queue_name,
        host=host,
        port=port,
        database_url=database_url,
    )
    logs.configure()
    serve(settings)


@main.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters."""


_filters = [
    click.option("--type", "job_type", default=None, help="Only this job type."),
    click.option("--group", default=None, help="Only this group."),
    click.option("--reason", default=None, help="Only this reason (error, timeout, ...)."),
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
@click.option("--limit", type=int, default=100)
@pass_ctx
def dlq_list(obj: _Context, /, limit: int, **options: Any) -> None:
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
@click.argument("job_id")
@pass_ctx
def dlq_show(obj: _Context, /, job_id: str) -> None:
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
@click.argument("job_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter matching the filters.")
@_with_filters
@pass_ctx
def dlq_replay(
    obj: _Context, /, job_ids: tuple[str, ...], replay_all: bool, **options: Any
) -> None:
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
@click.argument("job_ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Every dead letter matching the filters.")
@_with_filters
@pass_ctx
def dlq_purge(obj: _Context, /, job_ids: tuple[str, ...], purge_all: bool, **options: Any) -> None:
    """Delete dead letters for good."""
    if bool(job_ids) == purge_all:
        raise click.UsageError("give JOB_IDS or --all (with optional filters)")
    ids = list(job_ids) or [i.id for i in obj.queue.dead_letters(**_filter_args(options))]
    click.echo(f"{obj.queue.purge(ids)} purged")


# -- groups --------------------------------------------------------------------------------------


@main.command("rate-limit")
@click.argument("group")
@click.argument("count", type=int)
@click.argument("per", type=float)
@pass_ctx
def rate_limit(obj: _Context, /, group: str, count: int, per: float) -> None:
    """Allow COUNT jobs of GROUP per PER seconds (GROUP '*' sets the default)."""
    obj.queue.set_rate_limit(group, count, per)


@main.command()
@click.argument("group")
@pass_ctx
def pause(obj: _Context, /, group: str) -> None:
    """Stop claiming GROUP's jobs (they stay queued)."""
    obj.queue.pause_group(group)


@main.command()
@click.argument("group")
@pass_ctx
def resume(obj: _Context, /, group: str) -> None:
    """Claim GROUP's jobs again."""
    obj.queue.resume_group(group)


# -- the demo ------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--duration",
    type=click.FloatRange(min=10),
    default=150.0,
    show_default=True,
    help="Seconds the hour is compressed to (traffic arrives over 80% of it; draining follows).",
)
@click.option(
    "--scale",
    type=click.FloatRange(min=0.01, max=10),
    default=1.0,
    show_default=True,
    help="Multiplies every job count; 1.0 sends 3,000 welcome emails.",
)
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    default=None,
    show_envvar=True,
    help="PostgreSQL to use; without it a private PostgreSQL is started.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Also write the report as JSON to this file.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    duration: float,
    scale: float,
    database_url: str | None,
    json_path: str | None,
) -> None:
    """Play a busy hour of a SaaS backend on real local services and report every job's fate.

    Without REDIS_URL (or --redis-url) a private redis-server is started. Exits 1 if any job
    is lost.
    """
    from pathlib import Path

    from conveyor.demo.run import Options, run_demo

    parent = ctx.find_root()
    given = parent.get_parameter_source("redis_url") != click.core.ParameterSource.DEFAULT
    options = Options(
        redis_url=parent.obj.redis_url if given else None,
        database_url=database_url or None,
        duration=duration,
        scale=scale,
        json_path=Path(json_path) if json_path else None,
    )
    sys.exit(run_demo(console, options))


# -- history and schedules -----------------------------------------------------------------------

_database_url = click.option(
    "--database-url",
    envvar="DATABASE_URL",
    show_envvar=True,
    required=True,
    help="PostgreSQL holding the task history.",
)


@main.command()
@click.argument("job_id", required=False)
@click.option("--summary", is_flag=True, help="Count jobs by type, class and state instead.")
@click.option("--since", type=click.DateTime(), help="Summary start (UTC) [default: --until - 1d].")
@click.option("--until", type=click.DateTime(), help="Summary end (UTC) [default: now].")
@_database_url
@pass_ctx
def history(
    obj: _Context,
    /,
    *,
    job_id: str | None,
    summary: bool,
    since: datetime | None,
    until: datetime | None,
    database_url: str,
) -> None:
    """Every transition of JOB_ID, or (--summary) job counts over a time range."""
    from datetime import timedelta

    from conveyor.history import connect, job_history, state_counts

    if summary == bool(job_id):
        raise click.UsageError("give JOB_ID or --summary")
    with connect(database_url) as conn:
        if job_id:
            events = job_history(conn, job_id, obj.queue_name)
            if not events:
                raise click.ClickException(f"no history of job {job_id} in {obj.queue_name}")
            table = Table("time (UTC)", "event", "attempt", "worker", "detail", title=job_id)
            for e in events:
                at = e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                table.add_row(at, e.kind, str(e.attempt or ""), e.worker, e.detail)
        else:
            end = until.replace(tzinfo=UTC) if until else datetime.now(UTC)
            start = since.replace(tzinfo=UTC) if since else end - timedelta(days=1)
            title = f"{obj.queue_name}: {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
            table = Table("type", "class", "state", "jobs", title=title)
            for row in state_counts(conn, start, end, obj.queue_name):
                table.add_row(row.job_type, row.priority, row.state, str(row.jobs))
    console.print(table)


@main.command("history-writer")
@_database_url
@pass_ctx
def history_writer(obj: _Context, /, database_url: str) -> None:
    """Copy the queue's events into PostgreSQL until SIGTERM (workers with DATABASE_URL set
    do this themselves; run this where they do not)."""
    import asyncio

    from conveyor import logs
    from conveyor.history.writer import run_standalone

    settings = dataclasses.replace(
        WorkerSettings.from_env(),
        redis_url=obj.redis_url,
        queue=obj.queue_name,
        database_url=database_url,
    )
    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(run_standalone(settings))


@main.group()
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
def schedule_list(obj: _Context, /, path: str) -> None:
    """Each schedule with its last settled tick and its next one."""
    from conveyor.schedule import from_ms, load_schedules

    schedules = load_schedules(path)
    keys = [obj.queue.keys.schedule(s.name) for s in schedules]
    lasts = obj.queue.client.mget(keys) if keys else []
    now = datetime.now(UTC)
    table = Table("name", "cron", "zone", "job type", "catch-up", "last tick", "next tick")
    for s, last in zip(schedules, lasts, strict=True):
        shown = from_ms(int(last)).astimezone(s.zone).isoformat() if last else "-"
        table.add_row(
            s.name, s.cron, s.timezone, s.job_type, s.catch_up, shown, s.next_tick(now).isoformat()
        )
    console.print(table)
