"""Recurring schedules: which ticks exist (across DST changes) and which one a pass enqueues."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from conveyor.errors import ConfigError
from conveyor.schedule import Due, Schedule, due_ticks, load_schedules, to_ms

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(cron: str, **options: object) -> Schedule:
    return Schedule("s", cron, "report", timezone="Europe/Berlin", **options)  # type: ignore[arg-type]


def ticks_after(schedule: Schedule, start: datetime, n: int) -> list[datetime]:
    ticks = []
    for _ in range(n):
        start = schedule.next_tick(start)
        ticks.append(start)
    return ticks


def utc_hours(ticks: list[datetime]) -> list[str]:
    return [t.astimezone(UTC).strftime("%m-%d %H:%M") for t in ticks]


def test_an_hourly_schedule_fires_every_real_hour_across_spring_forward() -> None:
    ticks = ticks_after(berlin("0 * * * *"), datetime(2025, 3, 30, 0, 30, tzinfo=BERLIN), 4)

    assert [t.isoformat() for t in ticks] == [
        "2025-03-30T01:00:00+01:00",
        "2025-03-30T03:00:00+02:00",
        "2025-03-30T04:00:00+02:00",
        "2025-03-30T05:00:00+02:00",
    ]
    assert utc_hours(ticks) == ["03-30 00:00", "03-30 01:00", "03-30 02:00", "03-30 03:00"]


def test_an_hourly_schedule_fires_in_both_passes_of_the_repeated_hour_at_fall_back() -> None:
    ticks = ticks_after(berlin("0 * * * *"), datetime(2025, 10, 26, 0, 30, tzinfo=BERLIN), 4)

    assert [t.isoformat() for t in ticks] == [
        "2025-10-26T01:00:00+02:00",
        "2025-10-26T02:00:00+02:00",
        "2025-10-26T02:00:00+01:00",
        "2025-10-26T03:00:00+01:00",
    ]
    assert utc_hours(ticks) == ["10-25 23:00", "10-26 00:00", "10-26 01:00", "10-26 02:00"]


def test_a_daily_time_skipped_by_spring_forward_fires_right_after_the_gap() -> None:
    ticks = ticks_after(berlin("30 2 * * *"), datetime(2025, 3, 29, 12, 0, tzinfo=BERLIN), 2)

    assert [t.isoformat() for t in ticks] == [
        "2025-03-30T03:00:00+02:00",
        "2025-03-31T02:30:00+02:00",
    ]


def test_a_daily_time_repeated_by_fall_back_fires_once() -> None:
    nightly = berlin("30 2 * * *")

    ticks = ticks_after(nightly, datetime(2025, 10, 25, 12, 0, tzinfo=BERLIN), 2)
    latest = nightly.latest_tick(datetime(2025, 10, 26, 4, 0, tzinfo=BERLIN))

    assert [t.isoformat() for t in ticks] == [
        "2025-10-26T02:30:00+02:00",
        "2025-10-27T02:30:00+01:00",
    ]
    assert latest.isoformat() == "2025-10-26T02:30:00+02:00"


def test_the_latest_tick_includes_the_present_instant() -> None:
    tick = datetime(2025, 6, 1, 9, 0, tzinfo=BERLIN)
    hourly = berlin("0 * * * *")

    assert hourly.latest_tick(tick) == tick
    assert hourly.latest_tick(tick - timedelta(milliseconds=1)) == tick - timedelta(hours=1)


def test_each_tick_has_its_own_dedup_key_and_schedule_script_arguments() -> None:
    nightly = berlin("30 2 * * *", payload={"kind": "nightly"}, priority="low")
    first, second = ticks_after(nightly, datetime(2025, 10, 25, 12, 0, tzinfo=BERLIN), 2)

    args = nightly.script_args(first)

    assert nightly.dedup_key(first) == "s@2025-10-26T02:30:00+02:00"
    assert nightly.dedup_key(second) == "s@2025-10-27T02:30:00+01:00"
    assert args[:2] == ["s", to_ms(first)]
    spec = args[2:]
    assert len(spec) == 13
    assert (spec[0], orjson.loads(spec[1]), spec[2], spec[8]) == (
        "report",
        {"kind": "nightly"},
        "low",
        "s@2025-10-26T02:30:00+02:00",
    )


HOURLY_TICK = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)


def hourly(catch_up: str) -> Schedule:
    return Schedule("h", "0 * * * *", "t", catch_up=catch_up)  # type: ignore[arg-type]


def enqueued(due: list[Due]) -> list[datetime]:
    assert all(d.enqueue for d in due)
    return [d.tick for d in due]


@pytest.mark.parametrize("catch_up", ["skip", "once"])
def test_a_tick_within_the_grace_is_enqueued_once_whatever_the_policy(catch_up: str) -> None:
    previous = to_ms(HOURLY_TICK - timedelta(hours=1))
    now = HOURLY_TICK + timedelta(seconds=30)

    assert enqueued(due_ticks(hourly(catch_up), now, previous, grace=60)) == [HOURLY_TICK]
    assert due_ticks(hourly(catch_up), now, to_ms(HOURLY_TICK), grace=60) == []


def test_a_slow_pass_loses_no_tick_that_is_still_on_time() -> None:
    every_second = Schedule("s", "* * * * * *", "t")
    last = to_ms(HOURLY_TICK)

    due = due_ticks(every_second, HOURLY_TICK + timedelta(seconds=3.5), last, grace=60)

    assert enqueued(due) == [HOURLY_TICK + timedelta(seconds=n) for n in (1, 2, 3)]


def test_after_downtime_skip_enqueues_nothing_for_the_missed_ticks() -> None:
    last = to_ms(HOURLY_TICK - timedelta(hours=5))

    assert due_ticks(hourly("skip"), HOURLY_TICK + timedelta(minutes=20), last, grace=60) == []


def test_after_downtime_once_enqueues_one_job_for_the_most_recent_missed_tick() -> None:
    last = to_ms(HOURLY_TICK - timedelta(hours=5))
    now = HOURLY_TICK + timedelta(minutes=20)

    assert enqueued(due_ticks(hourly("once"), now, last, grace=60)) == [HOURLY_TICK]
    assert due_ticks(hourly("once"), now, to_ms(HOURLY_TICK), grace=60) == []


@pytest.mark.parametrize(("catch_up", "extra"), [("skip", []), ("once", [HOURLY_TICK])])
def test_a_missed_tick_is_caught_up_by_policy_beside_an_on_time_one(
    catch_up: str, extra: list[datetime]
) -> None:
    last = to_ms(HOURLY_TICK - timedelta(hours=3))
    now = HOURLY_TICK + timedelta(hours=1, seconds=10)

    due = due_ticks(hourly(catch_up), now, last, grace=60)

    assert enqueued(due) == [*extra, HOURLY_TICK + timedelta(hours=1)]


def test_a_new_schedule_never_catches_up_on_ticks_before_it_existed() -> None:
    late = due_ticks(hourly("once"), HOURLY_TICK + timedelta(minutes=20), None, grace=60)
    on_time = due_ticks(hourly("once"), HOURLY_TICK + timedelta(seconds=2), None, grace=60)

    assert late == [Due(HOURLY_TICK, enqueue=False)]
    assert on_time == [Due(HOURLY_TICK, enqueue=True)]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cron", "61 * * * *", "not a cron expression"),
        ("timezone", "Mars/Olympus", "Mars/Olympus"),
        ("catch_up", "twice", "catch_up"),
        ("name", "has space", "schedule name"),
        ("priority", "urgent", "priority"),
        ("payload", {1, 2}, "JSON"),
    ],
)
def test_an_invalid_schedule_is_refused_when_loaded(
    field: str, value: object, message: str
) -> None:
    fields: dict[str, object] = {"name": "s", "cron": "0 * * * *", "job_type": "t", field: value}

    with pytest.raises(ConfigError, match=message):
        Schedule(**fields)  # type: ignore[arg-type]


def test_schedules_load_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - name: nightly-report\n"
        "    cron: '30 2 * * *'\n"
        "    timezone: Europe/Berlin\n"
        "    job_type: build_report\n"
        "    payload: {kind: nightly}\n"
        "    priority: low\n"
        "    catch_up: once\n"
        "  - {name: heartbeat, cron: '*/5 * * * *', job_type: ping}\n"
    )

    nightly, heartbeat = load_schedules(path)

    assert nightly == Schedule(
        "nightly-report",
        "30 2 * * *",
        "build_report",
        timezone="Europe/Berlin",
        payload={"kind": "nightly"},
        priority="low",
        catch_up="once",
    )
    assert (heartbeat.timezone, heartbeat.catch_up) == ("UTC", "skip")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "schedules:\n"
            "  - {name: a, cron: '* * * * *', job_type: t}\n"
            "  - {name: a, cron: '0 * * * *', job_type: t}\n",
            "unique",
        ),
        ("schedules:\n  - {name: a, cron: '* * * * *', job_type: t, color: red}\n", "color"),
        ("jobs: []\n", "schedules"),
    ],
)
def test_a_bad_schedule_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=message):
        load_schedules(path)
