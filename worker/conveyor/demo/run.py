"""``conveyor demo`` from start to finish: set up, play the hour, drain, count, report, clean up.

Everything the demo starts (Redis and PostgreSQL when no URL is given, the SMTP and webhook
servers, the worker supervisors, a temporary directory, a PostgreSQL schema, the queue's keys
in a Redis it was given) is registered for clean-up the moment it exists, and cleaned up in
reverse order however the run ends, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import orjson
import redis
from rich.console import Console

from conveyor.config import QueueConfig
from conveyor.demo import dataset
from conveyor.demo.collect import Run, collect
from conveyor.demo.conductor import Conductor
from conveyor.demo.env import DemoEnv
from conveyor.demo.fleet import POOLS, Fleet
from conveyor.demo.ledger import LedgerKeys
from conveyor.demo.live import Dashboard
from conveyor.demo.report import render
from conveyor.demo.scenario import (
    CUSTOMERS,
    DEFAULT_LIMIT,
    PRIORITY_OF,
    TRAFFIC_END,
    Scenario,
    build,
)
from conveyor.demo.services import MailServer, WebhookEndpoint
from conveyor.errors import ConfigError, ConveyorError
from conveyor.keys import PRIORITY_CLASSES
from conveyor.local import PostgresServer, RedisServer
from conveyor.queue import Queue

KEEP_FINISHED = 6 * 3600.0
"""Seconds finished jobs stay in Redis, so the final count can read every job's state."""
WORKER_START_TIMEOUT = 60.0
REPORT_WIDTH = 120


@dataclass(frozen=True)
class Options:
    redis_url: str | None
    """None: start a private redis-server."""
    database_url: str | None
    """None: start a private PostgreSQL."""
    duration: float
    scale: float
    json_path: Path | None = None
    drain_timeout: float = 180.0


def run_demo(console: Console, options: Options) -> int:
    """Run the demo; returns the exit code (1 if any job was lost or a check failed)."""
    if not console.is_terminal and console.width < REPORT_WIDTH:
        # Logs and pipes get 80 columns by default, too narrow for the report's tables.
        console = Console(width=REPORT_WIDTH)
    stack = contextlib.ExitStack()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(console, options, stack)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything the demo started[/]")
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            with console.status("stopping workers and services"):
                stack.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


def _interrupt(_signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt


@dataclass
class _Stage:
    """What the set-up started, for the play and the count."""

    queue: Queue
    fleet: Fleet
    mail: MailServer
    hooks: WebhookEndpoint
    work: Path
    orders: int


def _run(console: Console, options: Options, stack: contextlib.ExitStack) -> int:
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:10]
    scenario = build(options.duration, options.scale)
    _introduce(console, scenario)
    work = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    try:
        with console.status("starting Redis, PostgreSQL, SMTP and webhook servers, workers"):
            stage = _set_up(stack, options, run_id, work)
        console.print(
            f"PostgreSQL holds {stage.orders:,} orders to export; "
            f"{sum(p.processes for p in POOLS)} worker processes in {len(POOLS)} pools; "
            f"files go to {work}",
            highlight=False,
        )
        ledger_keys = LedgerKeys(run_id)
        planned = {PRIORITY_OF[t]: n for t, n in scenario.planned.items()}
        with Dashboard(console, planned, scenario.duration) as dashboard:
            conductor = Conductor(stage.queue, stage.fleet, ledger_keys, scenario, dashboard)
            conductor.play()
            drained = conductor.drain(options.drain_timeout)
        if not drained:
            console.print(f"[red]the queue did not drain within {options.drain_timeout:.0f}s[/]")
        with console.status("stopping the workers and counting every job"):
            stage.fleet.stop()
            result = collect(
                Run(
                    scenario=scenario,
                    client=stage.queue.client,
                    keys=stage.queue.keys,
                    ledger_keys=ledger_keys,
                    produced=conductor.produced,
                    mail=stage.mail,
                    webhooks=stage.hooks,
                    output_dir=work,
                    harms=conductor.harms,
                    peak_ready=conductor.peak_ready,
                    elapsed=time.monotonic() - started,
                )
            )
    except ConveyorError:
        _show_log(console, work / "workers.log")
        raise
    render(console, result)
    if options.json_path is not None:
        options.json_path.write_bytes(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2))
    if not result.passed:
        _show_log(console, work / "workers.log")
    return 0 if result.passed else 1


def _set_up(stack: contextlib.ExitStack, options: Options, run_id: str, work: Path) -> _Stage:
    # The servers: private ones unless the user gave URLs.
    redis_url = options.redis_url or _private_redis(stack)
    database_url = options.database_url or _private_postgres(stack)

    # The outside world the handlers talk to.
    for sub in ("invoices", "exports"):
        (work / sub).mkdir()
    schema = f"conveyor_demo_{run_id}"
    stack.callback(_quietly, dataset.drop, database_url, schema)
    orders = dataset.create(database_url, schema)
    mail = MailServer().start()
    stack.callback(mail.stop)
    hooks = WebhookEndpoint().start()
    stack.callback(hooks.stop)

    # The queue (a fresh name in a Redis that may hold other queues) and its workers.
    queue_name = f"demo-{run_id}" if options.redis_url else "demo"
    queue = _queue(stack, redis_url, queue_name, run_id, own_redis=not options.redis_url)
    env = DemoEnv(redis_url, run_id, mail.port, hooks.url, database_url, schema, str(work))
    # DATABASE_URL also switches on the workers' task history where it is available.
    environ = {
        **os.environ,
        **env.to_environ(),
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
    }
    fleet = Fleet(redis_url, queue_name, environ, work / "workers.log")
    stack.callback(fleet.stop)
    fleet.start()
    _wait_for_workers(fleet, queue.client)
    return _Stage(queue, fleet, mail, hooks, work, orders)


def _introduce(console: Console, scenario: Scenario) -> None:
    planned = sorted(
        scenario.planned.items(), key=lambda kv: PRIORITY_CLASSES.index(PRIORITY_OF[kv[0]])
    )
    console.rule("[bold]conveyor demo[/]: a busy hour of a SaaS backend")
    console.print(
        f"{sum(n for _, n in planned):,} jobs ({', '.join(f'{n:,} {t}' for t, n in planned)}) "
        f"plus {scenario.duplicates:,} duplicate enqueues, arriving over "
        f"{scenario.duration * TRAFFIC_END:.0f}s; one worker process is killed with SIGKILL "
        "and another stopped with SIGTERM on the way.",
        highlight=False,
    )


def _private_redis(stack: contextlib.ExitStack) -> str:
    server = RedisServer()
    stack.callback(server.cleanup)
    return server.start().url


def _private_postgres(stack: contextlib.ExitStack) -> str:
    server = PostgresServer()
    stack.callback(server.cleanup)
    return server.start().url


def _queue(
    stack: contextlib.ExitStack, url: str, name: str, run_id: str, *, own_redis: bool
) -> Queue:
    queue = Queue.from_url(url, name)
    stack.callback(queue.client.close)
    if not own_redis:
        patterns = [f"{queue.keys.base}*", f"{LedgerKeys(run_id).entries.rsplit(':', 1)[0]}:*"]
        stack.callback(_quietly, _delete_keys, queue.client, patterns)
    queue.configure(QueueConfig(done_retention=KEEP_FINISHED))
    queue.set_rate_limit("*", DEFAULT_LIMIT, 1.0)
    for customer in CUSTOMERS:
        if customer.limit != DEFAULT_LIMIT:
            queue.set_rate_limit(customer.name, customer.limit, 1.0)
    return queue


def _delete_keys(client: redis.Redis, patterns: list[str]) -> None:
    for pattern in patterns:
        batch = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(batch), 1000):
            client.unlink(*batch[start : start + 1000])


def _wait_for_workers(fleet: Fleet, client: redis.Redis) -> None:
    wanted = sum(pool.processes for pool in POOLS)
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while len(fleet.workers(client)) < wanted:
        if fleet.dead_supervisors() or time.monotonic() > deadline:
            raise ConfigError("the worker processes did not start (their log is shown above)")
        time.sleep(0.2)


def _quietly(action: Callable[..., Any], *args: Any) -> None:
    """Clean-up that must not stop the rest of the clean-up (the server may be gone)."""
    with contextlib.suppress(Exception):
        action(*args)


def _show_log(console: Console, log: Path, lines: int = 30) -> None:
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    console.print(f"[dim]last lines of the workers' log ({log}):[/]")
    for line in tail:
        console.print(line, markup=False, highlight=False)
