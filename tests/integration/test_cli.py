"""The command line's output for people and for scripts: ``dlq list`` (table and ``--json``),
``rate-limit`` (set, ``--list``, ``--clear``, ``--unlimited``), ``top`` without a terminal, and
``schedule list`` on the README's example, all against the real Redis of the fixtures.

Commands whose behaviour depends on the terminal (its width, whether there is one) run as
``python -m conveyor`` subprocesses with their standard output on a pipe; the others run in
process through click's ``CliRunner``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import orjson
import pytest
import redis
from click.testing import CliRunner, Result

from conveyor.cli import main
from conveyor.errors import JobNotFound
from conveyor.queue import Queue
from tests.support.readme import readme_schedules
from tests.support.scripted import ScriptedWorker
from tests.support.workers import wait_until


def cli(redis_url: str, queue: Queue, *args: str) -> Result:
    return CliRunner().invoke(main, ["--redis-url", redis_url, "--queue", queue.keys.queue, *args])


def conveyor(
    redis_url: str, queue: Queue, *args: str, columns: int = 80, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``conveyor`` in its own process, its output on a pipe and COLUMNS set as given."""
    globals_ = ["--redis-url", redis_url, "--queue", queue.keys.queue]
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *globals_, *args],
        env=_environment(columns),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _environment(columns: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CONVEYOR_QUEUE")}
    env.pop("FORCE_TERMINAL", None)
    return env | {"COLUMNS": str(columns), "PYTHONUNBUFFERED": "1"}


def dead_letters(
    queue: Queue, worker: ScriptedWorker, groups: list[str], message: str = "boom"
) -> list[str]:
    """One dead letter per group (its only attempt failed permanently), oldest first."""
    ids = []
    for group in groups:
        ids.append(queue.enqueue("send_welcome_email", {"to": group}, group=group).id)
        (job,) = worker.claim().jobs
        worker.fail(job, reason="error", message=message, permanent=True)
    return ids


# -- dlq list ----------------------------------------------------------------------------------


def test_dlq_list_json_prints_one_full_record_per_dead_letter(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    first, second = dead_letters(
        queue, worker, ["acme", "a-group-name-longer-than-any-column"], "Traceback\nValueError: 3"
    )
    redis_client.delete(queue.keys.errors(second))  # a record without its error list

    result = cli(redis_url, queue, "dlq", "list", "--json")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    records = [orjson.loads(line) for line in lines]
    info = queue.get_job(first)
    assert records[0] == {
        "id": first,
        "type": "send_welcome_email",
        "class": "normal",
        "group": "acme",
        "reason": "error",
        "attempts": 1,
        "max_attempts": 3,
        "died": records[0]["died"],
        "error": "Traceback\nValueError: 3",
        "error_reason": "error",
        "error_at": records[0]["error_at"],
    }
    assert len(first) == 30
    assert info.dead_at is not None
    assert datetime.fromisoformat(records[0]["died"]).timestamp() == pytest.approx(info.dead_at)
    error_at = datetime.fromisoformat(records[0]["error_at"]).timestamp()
    assert error_at == pytest.approx(info.errors[-1]["at"] / 1000)
    assert records[1]["id"] == second
    assert records[1]["group"] == "a-group-name-longer-than-any-column"
    assert (records[1]["error"], records[1]["error_reason"], records[1]["error_at"]) == (
        None,
        None,
        None,
    )


def test_dlq_list_shows_what_it_can_of_a_record_written_by_a_foreign_client(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    (job_id,) = dead_letters(queue, worker, ["acme"])
    redis_client.hset(queue.keys.job(job_id), "dt", "9" * 30)  # beyond any datetime
    redis_client.delete(queue.keys.errors(job_id))
    redis_client.rpush(queue.keys.errors(job_id), b'{"at": "soon", "error": 5}', b"not json")

    as_json = cli(redis_url, queue, "dlq", "list", "--json")
    table = cli(redis_url, queue, "dlq", "list")

    assert as_json.exit_code == 0, as_json.output
    record = orjson.loads(as_json.stdout)
    assert (record["id"], record["died"]) == (job_id, None)
    assert (record["error"], record["error_reason"], record["error_at"]) == ("not json", None, None)
    assert table.exit_code == 0, table.output
    assert job_id in table.stdout


def test_dlq_list_json_takes_the_filters_and_the_limit(queue: Queue, redis_url: str) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    ids = dead_letters(queue, worker, ["a", "b", "a"])

    def listed(*args: str) -> list[str]:
        result = cli(redis_url, queue, "dlq", "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [orjson.loads(line)["id"] for line in result.stdout.splitlines()]

    assert listed() == ids
    assert listed("--group", "a") == [ids[0], ids[2]]
    assert listed("--limit", "1") == ids[:1]
    assert listed("--type", "nothing") == []


@pytest.mark.parametrize("columns", [200, 80, 40])
def test_the_dlq_table_never_cuts_an_id(queue: Queue, redis_url: str, columns: int) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    ids = dead_letters(queue, worker, ["acme", "a-rather-long-group-name", ""])

    done = conveyor(redis_url, queue, "dlq", "list", columns=columns)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for job_id in ids:
        assert len(job_id) == 30
        assert any(job_id in line for line in lines), f"{job_id} is cut in:\n{done.stdout}"
    assert "…" not in done.stdout


# -- rate-limit --------------------------------------------------------------------------------


def test_rate_limit_list_shows_every_stored_limit(queue: Queue, redis_url: str) -> None:
    for args in (["acme", "10", "1"], ["*", "100", "60"], ["--unlimited", "vip"], ["", "5", "0.5"]):
        assert cli(redis_url, queue, "rate-limit", *args).exit_code == 0

    as_json = cli(redis_url, queue, "rate-limit", "--list", "--json")
    table = cli(redis_url, queue, "rate-limit", "--list")

    assert as_json.exit_code == 0, as_json.output
    assert [orjson.loads(line) for line in as_json.stdout.splitlines()] == [
        {"group": "*", "count": 100, "per": 60.0, "unlimited": False, "stored": "100:60000"},
        {"group": "", "count": 5, "per": 0.5, "unlimited": False, "stored": "5:500"},
        {"group": "acme", "count": 10, "per": 1.0, "unlimited": False, "stored": "10:1000"},
        {"group": "vip", "count": None, "per": None, "unlimited": True, "stored": "-"},
    ]
    assert table.exit_code == 0, table.output
    rows = [re.sub(r"\s+", " ", line) for line in table.stdout.splitlines()]
    assert "│ * (default) │ 100 per 60 s │" in rows
    assert "│ '' (no group) │ 5 per 0.5 s │" in rows
    assert "│ acme │ 10 per 1 s │" in rows
    assert "│ vip │ no limit (exempt from the default) │" in rows


def test_rate_limit_list_says_when_nothing_is_set(queue: Queue, redis_url: str) -> None:
    result = cli(redis_url, queue, "rate-limit", "--list")
    as_json = cli(redis_url, queue, "rate-limit", "--list", "--json")

    assert (result.exit_code, result.stdout) == (0, "no rate limits are set\n")
    assert (as_json.exit_code, as_json.stdout) == (0, "")


def test_a_stored_limit_the_claim_script_cannot_read_is_listed_as_such(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    redis_client.hset(queue.keys.limits, "acme", "ten a second")

    result = cli(redis_url, queue, "rate-limit", "--list", "--json")
    table = cli(redis_url, queue, "rate-limit", "--list")

    assert orjson.loads(result.stdout) == {
        "group": "acme",
        "count": None,
        "per": None,
        "unlimited": False,
        "stored": "ten a second",
    }
    assert "unreadable 'ten a second'" in re.sub(r"\s+", " ", table.stdout)


def test_clearing_and_exempting_a_group_change_what_it_may_claim(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)

    def claimable(group: str) -> int:
        """Of 3 new jobs of ``group``, how many a worker may claim now."""
        queue.enqueue_batch("t", range(3), group=group)
        return len(worker.claim(10).jobs)

    assert cli(redis_url, queue, "rate-limit", "*", "1", "3600").exit_code == 0
    assert cli(redis_url, queue, "rate-limit", "acme", "2", "3600").exit_code == 0
    assert claimable("acme") == 2  # its own limit
    assert claimable("globex") == 1  # the default

    exempt = cli(redis_url, queue, "rate-limit", "--unlimited", "vip")
    assert (exempt.exit_code, exempt.stdout) == (0, "vip: no limit (exempt from the default)\n")
    assert redis_client.hget(queue.keys.limits, "vip") == b"-"
    assert claimable("vip") == 3

    assert cli(redis_url, queue, "rate-limit", "initech", "3", "1").exit_code == 0
    cleared = cli(redis_url, queue, "rate-limit", "--clear", "initech")
    assert (cleared.exit_code, cleared.stdout) == (0, "initech: the default, 1 per 3600 s\n")
    assert redis_client.hget(queue.keys.limits, "initech") is None
    assert claimable("initech") == 1

    no_default = cli(redis_url, queue, "rate-limit", "--clear", "*")
    assert no_default.stdout == "no default: groups without a limit of their own have none\n"
    assert redis_client.hgetall(queue.keys.limits) == {b"acme": b"2:3600000", b"vip": b"-"}
    # Besides umbrella's 3: the 2 jobs of globex and of initech that the default held back.
    assert claimable("umbrella") == 3 + 2 + 2
    cleared = cli(redis_url, queue, "rate-limit", "--clear", "vip")
    assert (cleared.exit_code, cleared.stdout) == (0, "vip: no limit\n")


@pytest.mark.parametrize(
    "args",
    [
        ["--list", "acme"],
        ["--json"],
        ["--clear"],
        ["--clear", "acme", "1"],
        ["--clear", "--unlimited", "acme"],
        ["--list", "--clear", "acme"],
        ["--unlimited", "*"],
        ["acme"],
        ["acme", "10"],
    ],
)
def test_rate_limit_refuses_incomplete_or_mixed_forms_and_changes_nothing(
    queue: Queue, redis_url: str, redis_client: redis.Redis, args: list[str]
) -> None:
    queue.set_rate_limit("acme", 3, 1)

    result = cli(redis_url, queue, "rate-limit", *args)

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Usage: ")
    assert redis_client.hgetall(queue.keys.limits) == {b"acme": b"3:1000"}


def test_rate_limit_still_sets_a_limit_from_three_arguments(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    result = cli(redis_url, queue, "rate-limit", "--", "-x", "10", "0.25")

    assert (result.exit_code, result.stdout) == (0, "")
    assert redis_client.hget(queue.keys.limits, "-x") == b"10:250"


# -- top ---------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[")


def test_top_piped_prints_one_plain_snapshot_and_exits(queue: Queue, redis_url: str) -> None:
    queue.enqueue_batch("t", range(7), priority="high")

    done = conveyor(redis_url, queue, "top", "--interval", "0.1", timeout=20)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert not _ANSI.search(done.stdout), "escape sequences in piped output"
    assert done.stdout.count(f"queue {queue.keys.queue}") == 1
    rows = {line.split()[1]: line.split()[3] for line in done.stdout.splitlines() if "│" in line}
    assert rows["critical"] == "0"
    assert rows["high"] == "7"
    assert "0 workers" in done.stdout


def test_top_with_a_count_prints_that_many_snapshots(queue: Queue, redis_url: str) -> None:
    result = cli(redis_url, queue, "top", "-n", "3", "--interval", "0.1")

    assert result.exit_code == 0, result.output
    assert result.stdout.count(f"queue {queue.keys.queue}") == 3


def test_top_endless_snapshots_stop_quietly_when_the_reader_leaves(
    queue: Queue, redis_url: str
) -> None:
    args = ["--redis-url", redis_url, "--queue", queue.keys.queue, "top", "-n", "0"]
    with subprocess.Popen(
        [sys.executable, "-m", "conveyor", *args, "--interval", "0.1"],
        env=_environment(80),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as top:
        assert top.stdout is not None
        assert top.stderr is not None
        try:
            first = top.stdout.readline()
            assert first.strip().startswith(f"queue {queue.keys.queue}".encode())
            top.stdout.close()  # `| head -1`
            assert top.wait(timeout=20) in (0, 1)
            assert top.stderr.read() == b""
        finally:
            if top.poll() is None:
                top.kill()


def test_top_piped_fails_in_one_line_when_redis_is_unreachable(queue: Queue) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]

    done = conveyor(f"redis://127.0.0.1:{closed}/0", queue, "top", timeout=20)

    assert done.returncode == 1
    assert done.stdout == ""
    assert re.fullmatch(r"Error: BackendUnavailable: .*\n", done.stderr)


# -- the README's schedules example ------------------------------------------------------------


def test_schedule_list_reads_the_readme_example(
    queue: Queue, redis_url: str, tmp_path: Path
) -> None:
    path = readme_schedules(tmp_path)

    done = conveyor(redis_url, queue, "schedule", "list", "--file", str(path), columns=200)

    assert done.returncode == 0, done.stderr
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("│")
    ]
    assert [row[:5] for row in rows] == [
        ["nightly-invoices", "30 2 * * *", "Europe/Berlin", "render_invoices", "once"],
        ["queue-report", "*/15 * * * *", "UTC", "send_queue_report", "skip"],
    ]
    assert rows[0][6].endswith((" 02:30:00+01:00", " 02:30:00+02:00"))


def test_the_console_script_runs_handlers_from_the_current_directory(
    redis_url: str, queue: Queue, tmp_path: Path
) -> None:
    """The README's `conveyor worker myapp.tasks`, run from the directory holding `myapp/`
    through the installed console script (whose sys.path, unlike `python -m conveyor`'s, does
    not start with the current directory): a new-user trial found it refused to start."""
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tasks.py").write_text(
        "from conveyor.registry import task\n\n\n@task('hello_cwd')\nasync def hello(job):\n"
        "    pass\n"
    )
    script = Path(sys.executable).parent / "conveyor"
    env = _environment(80)
    env.pop("PYTHONPATH", None)
    job = queue.enqueue("hello_cwd", {})
    argv = [str(script), "--redis-url", redis_url, "--queue", queue.keys.queue]
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [*argv, "worker", "myapp.tasks", "--concurrency", "1", "--grace", "1"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: _gone(queue, job.id) or worker.poll() is not None, 20, "the job")
        assert worker.poll() is None, log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def _gone(queue: Queue, job_id: str) -> bool:
    try:
        queue.get_job(job_id)
    except JobNotFound:
        return True
    return False
