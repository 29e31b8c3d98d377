"""``conveyor demo``, shortened, end to end: private Redis and PostgreSQL, real SMTP and HTTP
servers, real worker processes, a kill -9 and a SIGTERM midway, and the report's numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DEMO = [sys.executable, "-m", "conveyor", "demo"]


def _environ() -> dict[str, str]:
    """No REDIS_URL or DATABASE_URL: the demo starts its own servers, as the README's does."""
    return {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("demo") / "report.json"
    done = subprocess.run(
        [*DEMO, "--duration", "20", "--scale", "0.1", "--json", str(path)],
        env=_environ(),
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _type(report: dict[str, Any], job_type: str) -> dict[str, Any]:
    return next(t for t in report["types"] if t["job_type"] == job_type)


def test_no_job_is_lost_and_every_job_ends_completed_or_dead_lettered(
    report: dict[str, Any],
) -> None:
    assert report["passed"]
    assert report["lost"] == 0
    assert report["pending"] == 0
    assert report["accepted"] == report["completed"] + report["dead_lettered"]
    assert set(report["states"]) <= {"done", "dead"}


def test_every_check_of_the_services_passes(report: dict[str, Any]) -> None:
    failed = [c for c in report["checks"] if not c["passed"]]
    assert failed == []


def test_every_welcome_email_reaches_the_smtp_server(report: dict[str, Any]) -> None:
    emails = _type(report, "send_welcome_email")
    assert emails["accepted"] == 300
    assert emails["completed"] == 300
    check = next(c for c in report["checks"] if c["name"].startswith("welcome emails"))
    assert check["actual"] == check["expected"] == 300


def test_duplicate_enqueues_are_suppressed(report: dict[str, Any]) -> None:
    assert report["duplicates_suppressed"] > 0
    assert _type(report, "render_invoice_pdf")["duplicates"] >= 10


def test_failing_webhooks_are_retried_and_the_hopeless_ones_dead_lettered_with_reasons(
    report: dict[str, Any],
) -> None:
    hooks = _type(report, "deliver_webhook")
    assert hooks["retries"] > 0
    reasons = {d["reason"] for d in report["dead_letters"] if d["type"] == "deliver_webhook"}
    assert reasons == {"error", "permanent_error"}
    assert hooks["dead"] == sum(d["count"] for d in report["dead_letters"])


def test_a_killed_and_a_stopped_worker_lose_none_of_the_jobs_they_held(
    report: dict[str, Any],
) -> None:
    killed, stopped = report["harms"]
    assert (killed["signal"], stopped["signal"]) == ("SIGKILL", "SIGTERM")
    assert killed["busy"] >= 1
    for harm in (killed, stopped):
        assert harm["lost"] == 0
        assert harm["completed"] + harm["dead_lettered"] == harm["busy"]


def test_critical_jobs_wait_less_than_the_low_backlog(report: dict[str, Any]) -> None:
    waits = report["waits"]
    assert waits["critical"]["count"] >= 300
    assert waits["critical"]["p50"] < waits["low"]["p50"]
    assert report["peak_ready"]["low"] > 50


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_every_process_the_demo_started_and_removes_its_files() -> None:
    demo = subprocess.Popen(
        [*DEMO, "--duration", "60", "--scale", "0.1"],
        env=_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    work = None
    for line in demo.stdout:
        if "files go to " in line:
            work = Path(line.rsplit("files go to ", 1)[1].strip())
        if "start arriving" in line:
            break
    started = _descendants(demo.pid)
    assert work is not None
    assert work.is_dir()
    assert len(started) >= 5  # redis-server, two supervisors and their three workers

    demo.send_signal(signal.SIGINT)
    output = demo.communicate(timeout=90)[0]

    assert demo.returncode == 130, output[-3000:]
    assert [pid for pid in started if _alive(pid)] == []
    assert not work.exists()
