"""Failed attempts: exponential backoff, full jitter, per-call overrides, permanent failures."""

from __future__ import annotations

import time

import redis

from conveyor.job import Backoff
from conveyor.queue import Queue
from tests.support.invariants import census
from tests.support.scripted import ScriptedWorker


def due_in_ms(redis_client: redis.Redis, queue: Queue, job_id: str, now_ms: int) -> int:
    score = redis_client.zscore(queue.keys.delayed("normal"), job_id)
    assert score is not None, f"{job_id} is not waiting to retry"
    return int(score) - now_ms


def test_without_jitter_the_backoff_doubles_from_its_base(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    job_id = queue.enqueue("t", max_attempts=3, backoff=Backoff(1, 60, jitter=False)).id
    worker = ScriptedWorker(redis_url, queue.keys)

    claim = worker.claim()
    assert worker.fail(*claim.jobs) == [(job_id, "retry", 1000)]
    after = worker.claim(0).now_ms
    # Scheduled by Redis time between the claim and the next call, exactly 1 s after the fail.
    assert claim.now_ms + 1000 <= int(
        redis_client.zscore(queue.keys.delayed("normal"), job_id) or 0
    )
    assert due_in_ms(redis_client, queue, job_id, after) <= 1000

    time.sleep(1.0)
    while not (claim := worker.claim()).jobs:
        time.sleep(0.01)
    assert claim.jobs[0].attempt == 2
    assert worker.fail(*claim.jobs) == [(job_id, "retry", 2000)]
    assert 2000 <= due_in_ms(redis_client, queue, job_id, claim.now_ms) <= 2000 + 100

    info = queue.get_job(job_id)
    assert [e["attempt"] for e in info.errors] == [1, 2]
    assert info.state == "delayed"


def test_the_backoff_never_exceeds_its_cap(queue: Queue, redis_url: str) -> None:
    queue.enqueue("t", max_attempts=10, backoff=Backoff(0.3, 0.5, jitter=False))
    worker = ScriptedWorker(redis_url, queue.keys)
    delays = []
    for _ in range(3):
        while not (claim := worker.claim()).jobs:
            time.sleep(0.01)
        [(_, _, delay)] = worker.fail(*claim.jobs)
        delays.append(delay)
    assert delays == [300, 500, 500]


def test_full_jitter_spreads_retries_between_zero_and_the_bound(
    queue: Queue, redis_url: str
) -> None:
    queue.enqueue_batch("t", range(200), backoff=Backoff(1, 60))
    worker = ScriptedWorker(redis_url, queue.keys)
    jobs = worker.claim(200).jobs
    delays = [delay for _, outcome, delay in worker.fail(*jobs) if outcome == "retry"]
    assert len(delays) == 200
    assert all(0 <= d <= 1000 for d in delays)
    # Spread over the whole range: each outer quarter is hit (all missing one: p = 0.75**200).
    assert min(delays) < 250
    assert max(delays) > 750
    assert len(set(delays)) > 100


def test_a_per_call_override_replaces_the_jobs_own_backoff(queue: Queue, redis_url: str) -> None:
    queue.enqueue_batch("t", range(2), max_attempts=5, backoff=Backoff(1, 60, jitter=False))
    worker = ScriptedWorker(redis_url, queue.keys)
    a, b = worker.claim(2).jobs
    assert worker.fail(a, backoff_base_ms=250, backoff_cap_ms=400)[0][1:] == ("retry", 250)
    # Overriding only the base keeps the job's own cap.
    assert worker.fail(b, backoff_base_ms=90_000)[0][1:] == ("retry", 60_000)

    time.sleep(0.3)
    [again] = worker.claim(2).jobs
    assert (again.id, again.attempt) == (a.id, 2)
    assert worker.fail(again, backoff_base_ms=250, backoff_cap_ms=400)[0][1:] == ("retry", 400)


def test_jitter_applies_to_an_overridden_bound_too(queue: Queue, redis_url: str) -> None:
    queue.enqueue_batch("t", range(100), backoff=Backoff(0, 0))
    worker = ScriptedWorker(redis_url, queue.keys)
    jobs = worker.claim(100).jobs
    delays = [d for _, _, d in worker.fail(*jobs, backoff_base_ms=4000, backoff_cap_ms=4000)]
    assert all(0 <= d <= 4000 for d in delays)
    assert min(delays) < 1000
    assert max(delays) > 3000


def test_a_permanent_failure_goes_straight_to_the_dead_letters(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    job_id = queue.enqueue("t", max_attempts=5).id
    worker = ScriptedWorker(redis_url, queue.keys)
    jobs = worker.claim().jobs
    assert worker.fail(*jobs, reason="invalid_input", permanent=True) == [(job_id, "dead", 0)]
    info = queue.get_job(job_id)
    assert (info.state, info.attempts, info.dead_reason) == ("dead", 1, "invalid_input")
    assert info.errors == [
        {
            "attempt": 1,
            "reason": "invalid_input",
            "error": "boom",
            "at": info.errors[0]["at"],
            "worker": "w1",
        }
    ]
    assert worker.claim().jobs == []
    census(redis_client, queue.keys).assert_sound()


def test_the_last_attempt_dead_letters_with_its_reason(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    job_id = queue.enqueue("t", max_attempts=2, backoff=Backoff(0, 0, jitter=False)).id
    worker = ScriptedWorker(redis_url, queue.keys)
    assert worker.fail(*worker.claim().jobs, reason="timeout") == [(job_id, "retry", 0)]
    assert worker.fail(*worker.claim().jobs, reason="error") == [(job_id, "dead", 0)]
    info = queue.get_job(job_id)
    assert (info.state, info.attempts, info.dead_reason) == ("dead", 2, "error")
    assert [e["reason"] for e in info.errors] == ["timeout", "error"]
    census(redis_client, queue.keys).assert_sound()
