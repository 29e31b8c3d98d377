"""The long-running commands: the worker supervisor and its worker processes, the standalone
history writer, the dashboard and the demo."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import secrets
import sys
import tempfile
from typing import Any, get_type_hints

import click

from conveyor.cli.params import TEXT, database_url_option
from conveyor.cli.root import Context, console, pass_ctx
from conveyor.config import WorkerSettings, env_name
from conveyor.connection import connect, redact
from conveyor.errors import ConfigError
from conveyor.queue import Queue

SETTINGS_ENV = "CONVEYOR_SETTINGS_JSON"
"""The variable through which the supervisor hands its settings, as JSON, to worker processes."""


_METAVARS = {
    "database_url": "URL",
    "schedules": "PATH",
    "classes": "CLASS,...",
    "metrics_port": "PORT",
    "metrics_host": "ADDRESS",
    "log_format": "[text|json]",
    "log_level": "LEVEL",
    "worker_name": "NAME",
    "pod_name": "NAME",
}


def _metavar(f: dataclasses.Field[Any], hint: Any) -> str:
    """What ``--help`` shows for a setting's value. The values stay text until
    ``WorkerSettings.from_env`` parses them, whose errors name the option and its variable."""
    if f.name in _METAVARS:
        return _METAVARS[f.name]
    if hint is int:
        return "INTEGER"
    if hint is float:
        return "SECONDS" if f.metadata["doc"].startswith("Seconds") else "FLOAT"
    return "TEXT"


def _worker_options() -> list[Any]:
    """One CLI option per WorkerSettings field, named and documented from the field."""
    options = []
    skip = {"redis_url", "queue", "import_path", "instance"}
    hints = get_type_hints(WorkerSettings)
    for f in dataclasses.fields(WorkerSettings):
        if f.name in skip:
            continue
        options.append(
            click.Option(
                ["--" + f.name.replace("_", "-")],
                type=TEXT,
                metavar=_metavar(f, hints[f.name]),
                default=None,
                envvar=env_name(f),
                show_envvar=True,
                help=f"{f.metadata['doc']} [default: {_show(f.default)}]",
            )
        )
    return options


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


@pass_ctx
def _worker(obj: Context, /, modules: tuple[str, ...], check: bool, **options: Any) -> None:
    """Run a supervisor that keeps worker processes running the handlers of MODULES."""
    from conveyor import logs
    from conveyor.supervisor import Supervisor, child_argv

    settings = _settings(obj, modules, options)
    if check:
        shown = dataclasses.asdict(settings)
        shown.update(
            redis_url=redact(settings.redis_url),
            database_url=settings.database_url and redact(settings.database_url),
        )
        click.echo(json.dumps(shown, indent=2))
        return
    _import_handlers(settings.import_path)
    logs.configure(settings.log_level, settings.log_format)
    if settings.metrics_port and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Worker processes write their metrics here; the supervisor's endpoint sums them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="conveyor-metrics-")
    settings = dataclasses.replace(settings, instance=secrets.token_hex(4))
    payload = dataclasses.asdict(settings)
    os.environ[SETTINGS_ENV] = json.dumps(payload)
    # Timeouts: the supervision loop must not hang on a Redis that stopped answering.
    queue = Queue(
        connect(settings.redis_url, socket_timeout=5, socket_connect_timeout=5), settings.queue
    )

    def release(pid: int, message: str) -> int:
        return queue.release_worker(settings.identity_of(pid), message)

    supervisor = Supervisor(child_argv([]), settings.processes, settings.grace, release)
    if settings.metrics_port:
        from conveyor import health
        from conveyor.metrics import QueueCollector

        health.serve(
            settings.metrics_port,
            supervisor.live,
            supervisor.ready,
            host=settings.metrics_host,
            collectors=[QueueCollector(queue)],
        )
    sys.exit(supervisor.run())


def _import_handlers(modules: tuple[str, ...]) -> None:
    """Import the handler modules once here, before any worker process starts: a module that
    cannot be imported would otherwise crash every process the supervisor restarts, forever,
    and a worker with no handlers would dead-letter every job it claims."""
    from conveyor.registry import default_registry

    # The `conveyor` console script starts with its own directory on sys.path, while the
    # worker processes run as `python -m conveyor`, which puts the current directory first:
    # give this check the workers' path, or it refuses modules that they would import.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise click.ClickException(
                f"cannot import handler module {module!r}: {type(exc).__name__}: {exc}"
                " (run from the directory that holds it, or set PYTHONPATH)"
            ) from exc
    if not default_registry.job_types():
        raise click.ClickException(
            "no job handlers registered: name the modules that define them, e.g. "
            "`conveyor worker myapp.tasks` (or set CONVEYOR_IMPORT)"
        )


def _settings(obj: Context, modules: tuple[str, ...], options: dict[str, Any]) -> WorkerSettings:
    env = {k: str(v) for k, v in options.items() if v is not None}
    environ = {
        **os.environ,
        **{env_name(f): env[f.name] for f in dataclasses.fields(WorkerSettings) if f.name in env},
    }
    base = WorkerSettings.from_env(environ)
    settings = dataclasses.replace(
        base,
        redis_url=obj.redis_url,
        queue=obj.queue_name,
        import_path=tuple(modules) or base.import_path,
    )
    _check_worker(settings)
    return settings


def _check_worker(settings: WorkerSettings) -> None:
    """What ``WorkerSettings`` lets through but would fail only once processes run: a NaN or
    infinite duration, a port out of range, an unknown log level."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    if not 0 <= settings.metrics_port <= 65535:
        raise ConfigError(f"metrics_port must be 0 to 65535, got {settings.metrics_port}")
    if not isinstance(logging.getLevelNamesMapping().get(settings.log_level.upper()), int):
        raise ConfigError(f"log_level {settings.log_level!r} is not a logging level name")


worker = click.Command(
    "worker",
    callback=_worker,
    params=[
        click.Argument(["modules"], nargs=-1, type=TEXT),
        *_worker_options(),
        click.Option(
            ["--check"],
            is_flag=True,
            help="Print the settings as JSON and exit: starts nothing, imports no MODULES.",
        ),
    ],
    help=_worker.__doc__,
)


@click.command("worker-process", hidden=True)
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


@click.command()
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
def dashboard(obj: Context, /, host: str, port: int, database_url: str) -> None:
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


@click.command()
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
@pass_ctx
def demo(
    obj: Context,
    /,
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

    options = Options(
        redis_url=obj.redis_url if obj.given("redis_url") else None,
        database_url=database_url or None,
        duration=duration,
        scale=scale,
        json_path=Path(json_path) if json_path else None,
    )
    sys.exit(run_demo(console, options))


@click.command("history-writer")
@database_url_option
@pass_ctx
def history_writer(obj: Context, /, database_url: str) -> None:
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
