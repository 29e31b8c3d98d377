"""Recurring jobs: cron schedules evaluated by every worker, each tick enqueued exactly once.

Every worker with schedules runs a ``Scheduler``; they need no leader, because ``schedule.lua``
records a schedule's last tick in the same atomic step as the enqueue and refuses a tick at or
before it. The job of a tick carries the deduplication key ``<name>@<tick in ISO 8601>``. Due
ticks are judged by Redis time (``TIME``, read once per pass), so a worker's skewed clock
neither fires a tick early nor misses one.

Catch-up after downtime: a tick is on time while it is at most ``grace`` seconds old, and
every on-time tick is enqueued, whatever the policy, so a slow pass loses none. Older ticks
that no scheduler enqueued were missed (every worker was down, say), and

- ``skip`` enqueues nothing for them: the schedule resumes at its next tick;
- ``once`` enqueues exactly one job for them, for the most recent missed tick.

A schedule seen for the first time has missed nothing: ticks before it existed are never
caught up.

Time zones and DST: ticks are computed by croniter in the schedule's IANA zone. A wall-clock
time that a spring-forward change skips fires at the first instant after the gap (02:30 becomes
03:00 in Europe/Berlin). A wall-clock time that a fall-back change repeats fires once, at its
first occurrence, unless the schedule fires every hour: then it keeps firing every real hour.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis
import redis.asyncio
import yaml
from croniter import croniter

from conveyor import scripts
from conveyor.errors import ConfigError, ConveyorError, InvalidJob
from conveyor.job import DEFAULT_PRIORITY, JobSpec, encode_payload
from conveyor.keys import Keyspace

log = logging.getLogger(__name__)

CatchUp = Literal["skip", "once"]
DEFAULT_GRACE = 60.0
"""Seconds a tick may be late and still count as on time (a restart, a slow pass)."""
MAX_TICKS_PER_PASS = 100
"""On-time ticks one pass enqueues per schedule; a later pass takes the rest."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _raise_if_cancelled() -> None:
    """Honour a cancellation that redis-py's asyncio client swallowed: one that lands while a
    command's socket timeout is armed can vanish (seen with XREADGROUP BLOCK, redis-py 8 on
    Python 3.11), and a loop that catches Redis errors would then never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def to_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 1000, UTC) + timedelta(milliseconds=ms % 1000)


@dataclass(frozen=True)
class Schedule:
    """One recurring job; ``cron`` has five fields, or six with seconds last (croniter)."""

    name: str
    cron: str
    job_type: str
    timezone: str = "UTC"
    """IANA zone the cron fields are read in, such as ``Europe/Berlin``."""
    payload: Any = field(default_factory=dict)
    priority: str = DEFAULT_PRIORITY
    catch_up: CatchUp = "skip"
    """What a missed tick gets after downtime: ``skip`` nothing, ``once`` one job."""
    max_attempts: int = 3
    timeout: float = 300.0
    """Seconds one attempt of the job may run."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"schedule name {self.name!r} must be 1-100 letters, digits, '_', '.' or '-'"
            )
        if not isinstance(self.cron, str) or not croniter.is_valid(self.cron):
            raise ConfigError(f"schedule {self.name}: {self.cron!r} is not a cron expression")
        if self.catch_up not in ("skip", "once"):
            raise ConfigError(f"schedule {self.name}: catch_up must be skip or once")
        try:
            ZoneInfo(self.timezone)
            # Built now so that a bad job type, priority or payload fails at load time.
            self._template  # noqa: B018
            self._payload  # noqa: B018
        except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
            raise ConfigError(f"schedule {self.name}: {exc}") from exc

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @cached_property
    def _payload(self) -> bytes:
        return encode_payload(self.payload)

    @cached_property
    def _template(self) -> tuple[str | int, ...]:
        spec = JobSpec(
            self.job_type,
            self.payload,
            priority=self.priority,
            max_attempts=self.max_attempts,
            timeout=self.timeout,
        )
        return spec.template()

    @cached_property
    def _every_hour(self) -> bool:
        hours = croniter(self.cron).expanded[1]
        return hours == ["*"] or len(hours) == 24

    def _repeated(self, tick: datetime) -> bool:
        """A second occurrence of a wall-clock time, in a schedule that fires at set hours."""
        if tick.fold == 0 or self._every_hour:
            return False
        return tick.replace(fold=0).utcoffset() != tick.utcoffset()

    def latest_tick(self, at: datetime) -> datetime:
        """The last tick at or before ``at`` (timezone-aware), in the schedule's zone."""
        # croniter's get_prev is strict; a millisecond later makes it include `at` itself.
        start = (at.astimezone(UTC) + timedelta(milliseconds=1)).astimezone(self.zone)
        ticks = croniter(self.cron, start)
        while True:
            tick: datetime = ticks.get_prev(datetime)
            if not self._repeated(tick):
                return tick

    def next_tick(self, at: datetime) -> datetime:
        """The first tick after ``at`` (timezone-aware), in the schedule's zone."""
        ticks = croniter(self.cron, at.astimezone(self.zone))
        while True:
            tick: datetime = ticks.get_next(datetime)
            if not self._repeated(tick):
                return tick

    def dedup_key(self, tick: datetime) -> str:
        return f"{self.name}@{tick.isoformat()}"

    def script_args(self, tick: datetime) -> list[Any]:
        """ARGV of ``schedule.lua`` for one tick."""
        spec: list[Any] = list(self._template)
        spec[1] = self._payload
        spec[8] = self.dedup_key(tick)
        return [self.name, to_ms(tick), *spec]


class Due(NamedTuple):
    tick: datetime
    enqueue: bool
    """False: only record the tick as settled (a new schedule's past tick)."""


def due_ticks(schedule: Schedule, now: datetime, last_ms: int | None, grace: float) -> list[Due]:
    """What one pass at ``now`` does for ``schedule``, oldest tick first, given the last tick
    settled for it (``last_ms``; None: never seen). See the module docstring for the rules."""
    horizon = now - timedelta(seconds=grace)
    if last_ms is None:
        latest = schedule.latest_tick(now)
        return [Due(latest, enqueue=latest >= horizon)]
    due: list[Due] = []
    if schedule.catch_up == "once":
        missed = schedule.latest_tick(horizon - timedelta(milliseconds=1))
        if to_ms(missed) > last_ms:
            due.append(Due(missed, enqueue=True))
    tick = schedule.next_tick(max(horizon - timedelta(milliseconds=1), from_ms(last_ms)))
    while tick <= now and len(due) < MAX_TICKS_PER_PASS:
        due.append(Due(tick, enqueue=True))
        tick = schedule.next_tick(tick)
    return due


class Scheduler:
    """Enqueues the due ticks of some schedules, pass after pass; safe to run in every worker."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keyspace,
        schedules: Sequence[Schedule],
        *,
        grace: float = DEFAULT_GRACE,
        max_sleep: float = 10.0,
    ) -> None:
        check_unique(schedules)
        self.client = client
        self.keys = keys
        self.schedules = list(schedules)
        self.grace = grace
        self.max_sleep = max_sleep
        self.enqueued = 0
        """Jobs this scheduler created (ticks other schedulers enqueued are not counted)."""

    async def run_once(self) -> float:
        """One pass: enqueue every due tick; returns seconds until the next tick."""
        seconds, micros = await self.client.time()
        now = from_ms(seconds * 1000 + micros // 1000)
        lasts = await self.client.mget([self.keys.schedule(s.name) for s in self.schedules])
        for schedule, last in zip(self.schedules, lasts, strict=True):
            for due in due_ticks(schedule, now, None if last is None else int(last), self.grace):
                if due.enqueue:
                    await self._enqueue(schedule, due.tick)
                else:
                    key = self.keys.schedule(schedule.name)
                    await self.client.set(key, to_ms(due.tick), nx=True)
        upcoming = min(s.next_tick(now) for s in self.schedules)
        return (upcoming - now).total_seconds()

    async def _enqueue(self, schedule: Schedule, tick: datetime) -> None:
        job_id, created = await scripts.SCHEDULE.arun(
            self.client, self.keys.script_keys, schedule.script_args(tick)
        )
        if job_id and int(created):
            self.enqueued += 1
            log.info(
                "schedule %s enqueued job %s for its %s tick",
                schedule.name,
                job_id.decode(),
                tick.isoformat(),
                extra={"event": "schedule_enqueued", "job_id": job_id.decode()},
            )

    async def run(self) -> None:
        """Pass after pass until cancelled, sleeping until the next tick (at most
        ``max_sleep``); a Redis outage is waited out with backoff and one warning."""
        failures = 0
        while True:
            _raise_if_cancelled()
            try:
                wait = await self.run_once()
            except (ConveyorError, redis.RedisError, OSError) as exc:
                if failures == 0:
                    log.warning(
                        "scheduler pass failed, retrying with backoff: %s",
                        exc,
                        extra={"event": "scheduler_failed"},
                    )
                failures += 1
                wait = random.uniform(0, min(self.max_sleep, 0.1 * 2**failures))
            else:
                failures = 0
            # A few ms past the tick, so that Redis time has reached it when the pass runs.
            await asyncio.sleep(min(self.max_sleep, max(wait, 0.0)) + 0.005)


def check_unique(schedules: Sequence[Schedule]) -> None:
    names = [s.name for s in schedules]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"schedule names must be unique: {', '.join(repeated)}")


def load_schedules(path: str | Path) -> list[Schedule]:
    """Schedules from a YAML file: a list of ``Schedule`` fields under ``schedules:``."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read schedules from {path}: {exc}") from exc
    items = document.get("schedules") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list under 'schedules:'")
    schedules = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: schedule {number} is not a mapping")
        try:
            schedules.append(Schedule(**item))
        except (TypeError, InvalidJob) as exc:
            raise ConfigError(f"{path}: schedule {number}: {exc}") from exc
    check_unique(schedules)
    return schedules


_declared: dict[str, Schedule] = {}


def recurring(name: str, cron: str, job_type: str, **options: Any) -> Schedule:
    """Declare a schedule in code (at import, like ``@task``); workers that import the module
    schedule it alongside those of ``CONVEYOR_SCHEDULES``."""
    schedule = Schedule(name, cron, job_type, **options)
    if name in _declared and _declared[name] != schedule:
        raise ConfigError(f"schedule {name!r} is already declared differently")
    _declared[name] = schedule
    return schedule


def configured_schedules(path: str = "") -> list[Schedule]:
    """The schedules declared in code plus those of the YAML file at ``path`` (if any)."""
    schedules = list(_declared.values())
    if path:
        schedules += load_schedules(path)
    check_unique(schedules)
    return schedules
