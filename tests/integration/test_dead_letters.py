"""The dead-letter queue: listing, inspecting, replaying (B14), purging and retention."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis
from click.testing import CliRunner

from conveyor.cli import main
from conveyor.config import QueueConfig
from conveyor.job import Backoff
from conveyor.leases import Claimed
from conveyor.queue import Queue
from tests.support.invariants import census, snapshot
from tests.support.scripted import ScriptedWorker


def kill(
    queue: Queue,
    worker: ScriptedWorker,
    job_type: str,
    n: int = 1,
    reason: str = "error",
    **options: Any,
) -> list[str]:
    """Enqueue n jobs and fail each once, permanently: n dead letters."""
    ids = [e.id for e in queue.enqueue_batch(job_type, range(n), **options)]
    claimed: list[Claimed] = []
    while len(claimed) < n:
        claimed += worker.claim(min(1000, n - len(claimed)), classes=None).jobs
    assert {job.id for job in claimed} == set(ids)
    for start in range(0, n, 1000):
        worker.fail(*claimed[start : start + 1000], reason=reason, permanent=True)
    return ids


def run_cli(redis_url: str, queue: Queue, *args: str) -> str:
    result = CliRunner().invoke(
        main, ["--redis-url", redis_url, "--queue", queue.keys.queue, *args]
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_dead_letters_are_listed_oldest_first_with_filters(queue: Queue, redis_url: str) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    email_a = kill(queue, worker, "email", group="a")
    email_b = kill(queue, worker, "email", group="b", reason="timeout")
    sms_a = kill(queue, worker, "sms", group="a")
    time.sleep(0.05)
    middle = time.time()
    time.sleep(0.05)
    sms_b = kill(queue, worker, "sms", group="b", reason="worker_lost")
    kill(queue, worker, "survivor", max_attempts=5)  # not dead: listed by nobody
    queue.enqueue("alive")

    def listed(**filters: Any) -> list[str]:
        return [info.id for info in queue.dead_letters(**filters)]

    everything = email_a + email_b + sms_a + sms_b
    assert listed()[:4] == everything
    assert listed(job_type="email") == email_a + email_b
    assert listed(group="a") == email_a + sms_a
    assert listed(reason="timeout") == email_b
    assert listed(job_type="sms", group="b") == sms_b
    assert listed(until=middle) == email_a + email_b + sms_a
    assert listed(since=middle, job_type="sms") == sms_b
    assert listed(limit=2) == email_a + email_b
    assert listed(job_type="nothing") == []


def test_a_dead_letter_shows_every_attempts_error(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    job_id = queue.enqueue(
        "t", {"n": 1}, max_attempts=3, backoff=Backoff(0, 0, jitter=False), group="g"
    ).id
    worker = ScriptedWorker(redis_url, queue.keys)
    for reason in ("error", "timeout"):
        worker.fail(*worker.claim().jobs, reason=reason, message=f"attempt failed: {reason}")
    worker.fail(*worker.claim().jobs, reason="error", message="Traceback ...\nValueError: 3")

    info = queue.get_job(job_id)
    assert (info.state, info.dead_reason, info.attempts, info.group) == ("dead", "error", 3, "g")
    assert [(e["attempt"], e["reason"], e["error"]) for e in info.errors] == [
        (1, "error", "attempt failed: error"),
        (2, "timeout", "attempt failed: timeout"),
        (3, "error", "Traceback ...\nValueError: 3"),
    ]
    assert info.dead_at is not None
    assert all(e["at"] / 1000 <= info.dead_at for e in info.errors)

    shown = orjson.loads(run_cli(redis_url, queue, "dlq", "show", job_id))
    assert shown["payload"] == {"n": 1}
    assert [e["error"] for e in shown["errors"]][-1] == "Traceback ...\nValueError: 3"


def test_a_replayed_job_returns_byte_identical_with_a_fresh_attempt_budget(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """B14 (a): D fails 3 times, is replayed, and starts over with attempt 1 of 3."""
    payload = {"amount": 12.50, "name": "Zoë", "nested": {"b": [1, 2.0, None], "a": "é"}}
    d = queue.enqueue(
        "charge",
        payload,
        priority="high",
        group="tenant-7",
        dedup_key="charge-42",
        max_attempts=3,
        backoff=Backoff(1, 60, jitter=False),
    ).id
    stored = redis_client.hgetall(queue.keys.job(d))
    worker = ScriptedWorker(redis_url, queue.keys)
    for attempt in range(3):
        [job] = worker.claim().jobs
        [(_, outcome, _)] = worker.fail(job, backoff_base_ms=0)
        assert outcome == ("dead" if attempt == 2 else "retry")

    report = queue.replay([d])
    assert (report.replayed, report.missing, report.skipped) == (1, [], 0)
    record = redis_client.hgetall(queue.keys.job(d))
    for name in (b"p", b"t", b"c", b"g", b"dk", b"m", b"bb", b"bc", b"bj", b"ct"):
        assert record.get(name) == stored.get(name), name
    info = queue.get_job(d)
    assert (info.state, info.attempts, info.replay_count) == ("queued", 0, 1)
    assert (info.dead_reason, info.dead_at) == ("", None)
    assert len(info.errors) == 3

    [job] = worker.claim().jobs
    assert job.payload == orjson.dumps(payload) == stored[b"p"]
    assert (job.id, job.attempt, job.max_attempts, job.priority, job.group) == (
        d,
        1,
        3,
        "high",
        "tenant-7",
    )
    # The first failure after a replay waits the base backoff, not the exhausted job's 4 s.
    assert worker.fail(job) == [(d, "retry", 1000)]
    assert len(queue.get_job(d).errors) == 4


def test_every_replay_is_counted_and_starts_the_budget_over(queue: Queue, redis_url: str) -> None:
    job_id = queue.enqueue("t", max_attempts=2, backoff=Backoff(0, 0)).id
    worker = ScriptedWorker(redis_url, queue.keys)
    for cycle in (1, 2, 3):
        for attempt in (1, 2):
            [job] = worker.claim().jobs
            assert (job.id, job.attempt) == (job_id, attempt)
            worker.fail(job)
        assert queue.get_job(job_id).state == "dead"
        assert queue.replay([job_id]).replayed == 1
        info = queue.get_job(job_id)
        assert (info.attempts, info.replay_count, len(info.errors)) == (0, cycle, 2 * cycle)


def test_replay_by_filter_touches_only_the_matching_dead_letters(
    queue: Queue, redis_url: str
) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    emails = kill(queue, worker, "email", 3)
    sms = kill(queue, worker, "sms", 2, reason="timeout")
    report = queue.replay_all(job_type="email")
    assert (report.replayed, report.skipped) == (3, 0)
    assert [info.id for info in queue.dead_letters()] == sms
    assert queue.replay_all(reason="error").replayed == 0
    assert queue.replay_all().replayed == 2
    assert list(queue.dead_letters()) == []
    assert sorted(worker.claim_ids(10)) == sorted(emails + sms)


def test_replaying_again_changes_nothing(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    ids = kill(queue, worker, "t", 3)
    assert queue.replay(ids).replayed == 3
    before = snapshot(redis_client, queue.keys)
    report = queue.replay([*ids, "no-such-job"])
    assert (report.replayed, report.missing, report.skipped) == (0, [], 4)
    assert snapshot(redis_client, queue.keys) == before
    assert [info.replay_count for info in map(queue.get_job, ids)] == [1, 1, 1]


def test_bulk_replay_skips_and_reports_dead_letters_whose_record_is_gone(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """B14 (b): 10,000 dead letters, 100 records deleted behind Conveyor's back."""
    worker = ScriptedWorker(redis_url, queue.keys)
    ids = kill(queue, worker, "t", 10_000, max_attempts=1)
    gone = ids[::100]
    redis_client.delete(*[queue.keys.job(i) for i in gone])

    output = run_cli(redis_url, queue, "dlq", "replay", "--all")
    assert output.splitlines()[0] == "9900 replayed, 100 missing, 0 skipped"
    assert sorted(line.removeprefix("missing: ") for line in output.splitlines()[1:]) == gone

    [stats] = queue.stats(["normal"])
    assert stats.ready == 9900
    again = queue.replay_all()
    assert (again.replayed, again.missing, again.skipped) == (0, [], 0)
    assert queue.replay(gone).skipped == 100
    assert queue.stats(["normal"])[0].ready == 9900
    found = census(redis_client, queue.keys)
    assert found.states["ready"] == set(ids) - set(gone)
    assert found.states["dead"] == set()


def test_dead_letter_counters_survive_records_deleted_behind_conveyors_back(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    ids = kill(queue, worker, "t", 3)
    redis_client.delete(queue.keys.job(ids[0]))
    report = queue.replay_all()
    assert (report.replayed, report.missing) == (2, [ids[0]])
    assert queue.stats(["normal"])[0].dead == 0

    # The same through purge, and for a class other than the default.
    lost = kill(queue, worker, "t", 2, priority="high")
    redis_client.delete(queue.keys.job(lost[0]))
    assert queue.stats(["high"])[0].dead == 2
    assert queue.purge(lost) == 2
    assert queue.stats(["high"])[0].dead == 0
    assert not redis_client.exists(queue.keys.dead_class)


def test_purge_deletes_dead_letters_and_nothing_else(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    worker = ScriptedWorker(redis_url, queue.keys)
    dead = kill(queue, worker, "t", 3)
    alive = queue.enqueue("alive").id
    before = snapshot(redis_client, queue.keys)
    assert queue.purge([alive, "no-such-job"]) == 0
    assert snapshot(redis_client, queue.keys) == before

    assert queue.purge(dead[:2]) == 2
    assert queue.purge(dead[:2]) == 0
    for job_id in dead[:2]:
        assert not redis_client.exists(queue.keys.job(job_id), queue.keys.errors(job_id))
    assert [info.id for info in queue.dead_letters()] == dead[2:]
    assert queue.stats(["normal"])[0].dead == 1
    census(redis_client, queue.keys).assert_sound()


def test_dead_letters_beyond_dead_max_are_purged_oldest_first(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.configure(QueueConfig(dead_max=5))
    worker = ScriptedWorker(redis_url, queue.keys)
    ids = [kill(queue, worker, "t")[0] for _ in range(8)]
    assert [info.id for info in queue.dead_letters()] == ids[3:]
    for job_id in ids[:3]:
        assert not redis_client.exists(queue.keys.job(job_id), queue.keys.errors(job_id))
    assert queue.stats(["normal"])[0].dead == 5
    census(redis_client, queue.keys).assert_sound()


def test_dead_letters_past_their_retention_are_purged(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.configure(QueueConfig(dead_retention=0.2))
    worker = ScriptedWorker(redis_url, queue.keys)
    old = kill(queue, worker, "t", 2)
    time.sleep(0.3)
    new = kill(queue, worker, "t")
    assert [info.id for info in queue.dead_letters()] == new
    assert not any(redis_client.exists(queue.keys.job(job_id)) for job_id in old)
    census(redis_client, queue.keys).assert_sound()


def test_retention_is_enforced_by_the_sweep_even_when_no_new_job_dies(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.configure(QueueConfig(dead_retention=0.2))
    worker = ScriptedWorker(redis_url, queue.keys)
    old = kill(queue, worker, "t", 2)
    time.sleep(0.3)
    worker.recover()
    assert list(queue.dead_letters()) == []
    assert not any(redis_client.exists(queue.keys.job(job_id)) for job_id in old)
    assert queue.stats(["normal"])[0].dead == 0
