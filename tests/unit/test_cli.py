"""What the command line documents without touching Redis: the worker's ``--help`` and the
README's example of a schedules file."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import get_type_hints

from click.testing import CliRunner

from conveyor.cli import main, running
from conveyor.config import WorkerSettings
from conveyor.schedule import configured_schedules, load_schedules
from tests.support.readme import readme_schedules


def _metavars() -> dict[str, str]:
    """Each option of ``conveyor worker --help`` with the metavar it shows."""
    result = CliRunner().invoke(main, ["worker", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return dict(re.findall(r"^  (--[a-z-]+) (\S+)", result.stdout, re.MULTILINE))


def test_worker_help_names_the_kind_of_every_numeric_setting() -> None:
    shown = _metavars()
    hints = get_type_hints(WorkerSettings)
    numeric = {
        "--" + f.name.replace("_", "-"): hints[f.name]
        for f in dataclasses.fields(WorkerSettings)
        if hints[f.name] in (int, float)
    }

    assert numeric, "WorkerSettings has no numeric field"
    for option, kind in numeric.items():
        assert option in shown, f"{option} is not in worker --help"
        expected = {"INTEGER", "PORT"} if kind is int else {"SECONDS", "FLOAT"}
        assert shown[option] in expected, f"{option} shows {shown[option]}"
    assert shown["--concurrency"] == "INTEGER"
    assert shown["--processes"] == "INTEGER"
    assert shown["--grace"] == "SECONDS"
    assert shown["--lease-ttl"] == "SECONDS"
    assert shown["--metrics-port"] == "PORT"


def test_every_named_worker_metavar_belongs_to_a_setting() -> None:
    names = {f.name for f in dataclasses.fields(WorkerSettings)}

    assert set(running._METAVARS) <= names


def test_the_readme_schedules_example_parses(tmp_path: Path) -> None:
    path = readme_schedules(tmp_path)

    loaded = load_schedules(path)
    configured = configured_schedules(str(path))

    assert [s.name for s in loaded] == ["nightly-invoices", "queue-report"]
    assert {s.name for s in loaded} <= {s.name for s in configured}
    nightly, report = loaded
    assert (nightly.cron, nightly.job_type, nightly.timezone) == (
        "30 2 * * *",
        "render_invoices",
        "Europe/Berlin",
    )
    assert (nightly.payload, nightly.priority, nightly.catch_up) == (
        {"run": "nightly"},
        "low",
        "once",
    )
    assert (nightly.max_attempts, nightly.timeout) == (5, 600)
    assert (report.timezone, report.priority, report.catch_up) == ("UTC", "normal", "skip")
    tick = nightly.next_tick(datetime(2025, 1, 10, 12, 0, tzinfo=UTC))
    assert tick.isoformat() == "2025-01-11T02:30:00+01:00"
