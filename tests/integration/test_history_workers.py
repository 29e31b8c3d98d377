"""INV-5 with real worker processes: the history has one attempt row per execution the
handlers' ledger saw, with the same outcome, written by the workers' own history writers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from conveyor.job import Backoff
from conveyor.local import PostgresServer
from conveyor.queue import Queue
from tests.support.workers import Ledger, Workers, wait_until

pytest_plugins = ["tests.support.worker_fixtures"]


@pytest.fixture
def history_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"h{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_server.url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def attempt_rows(url: str, queue: str) -> list[tuple[str, int, str | None, str | None]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT job_id, attempt, outcome, outcome_detail FROM conveyor.attempt"
            " WHERE queue = %s",
            (queue,),
        ).fetchall()


def test_history_has_one_attempt_row_per_execution_with_its_outcome(
    workers: Workers,
    queue: Queue,
    job_ledger: Ledger,
    history_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", history_url)
    workers.start(history_claim_idle=1)
    workers.start(history_claim_idle=1)
    quick = Backoff(0, 0, jitter=False)
    # Alone, so that the process it kills has no other job whose outcome dies with it.
    queue.enqueue("kill_self", {"once": True}, backoff=quick)
    job_ledger.wait_rows(2, timeout=15)
    queue.enqueue_batch("noop", [{}] * 10)
    queue.enqueue_batch("fail_once", [{}] * 8, backoff=quick)
    queue.enqueue_batch("fail", [{}] * 3, backoff=quick)
    executions = 2 + 10 + 8 * 2 + 3 * 3

    job_ledger.wait_rows(executions, timeout=30)

    def all_attempts_ended() -> list[tuple[str, int, str | None, str | None]] | None:
        rows = attempt_rows(history_url, queue.keys.queue)
        ended = len(rows) >= executions and all(outcome for _, _, outcome, _ in rows)
        return rows if ended else None

    rows = wait_until(all_attempts_ended, 20, "every attempt with its outcome in the history")

    ledger = job_ledger.rows()
    assert len(ledger) == len(rows) == executions
    outcomes = {(job_id, attempt): (outcome, detail) for job_id, attempt, outcome, detail in rows}
    assert len(outcomes) == executions
    for run in ledger:
        outcome, detail = outcomes[(run["job_id"], run["attempt"])]
        if run["outcome"] == "ok":
            assert outcome == "completed"
        elif run["outcome"] == "killed":
            assert (outcome, detail.split(":")[0]) == ("retried", "worker_lost")
        elif run["attempt"] < 3:
            assert (outcome, detail) == ("retried", "error:0")
        else:
            assert (outcome, detail) == ("dead_lettered", "error")
    with psycopg.connect(history_url) as conn:
        (started,) = conn.execute(
            "SELECT count(*) FROM conveyor.job_event WHERE queue = %s AND kind = 'started'",
            (queue.keys.queue,),
        ).fetchone() or (0,)
    assert started == executions
