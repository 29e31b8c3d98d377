"""Leases: fencing tokens (INV-3), attempt accounting (INV-4), recovery of expired leases (B04)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis
import redis.asyncio

from conveyor.errors import BackendUnavailable
from conveyor.job import Backoff
from conveyor.leases import Claimed, LeaseClient
from conveyor.queue import Queue
from tests.support.invariants import census, events, snapshot
from tests.support.scripted import ScriptedWorker

SHORT_TTL_MS = 50


def expire(worker: ScriptedWorker) -> tuple[int, int]:
    """Let every short lease run out, then recover them."""
    time.sleep(SHORT_TTL_MS * 2 / 1000)
    return worker.recover()


def test_every_report_with_a_stale_token_changes_nothing(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """INV-3: the first worker's lease expired and the job was leased again to a second."""
    queue.enqueue("t", max_attempts=5, backoff=Backoff(0, 0, jitter=False))
    first = ScriptedWorker(redis_url, queue.keys, "w1", lease_ttl_ms=SHORT_TTL_MS)
    [old] = first.claim().jobs
    assert expire(first) == (1, 1)
    second = ScriptedWorker(redis_url, queue.keys, "w2")
    [new] = second.claim().jobs
    assert (new.id, new.attempt) == (old.id, 2)

    before = snapshot(redis_client, queue.keys)
    assert first.ack(old) == [old.id]
    assert first.fail(old) == [(old.id, "stale", 0)]
    assert first.fail(old, permanent=True) == [(old.id, "stale", 0)]
    assert first.extend(old) == [old.id]
    assert first.hand_back(old) == [old.id]
    assert snapshot(redis_client, queue.keys) == before

    # The current holder is unaffected and finishes the job once.
    assert second.extend(new) == []
    assert second.ack(new) == []
    assert second.ack(new) == [new.id]
    census(redis_client, queue.keys).assert_sound()


def test_a_token_stays_stale_after_the_job_finished_or_was_handed_back(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.enqueue_batch("t", range(2), max_attempts=1)
    worker = ScriptedWorker(redis_url, queue.keys)
    done, returned = worker.claim(2).jobs
    worker.ack(done)
    assert worker.hand_back(returned) == []

    before = snapshot(redis_client, queue.keys)
    for job in (done, returned):
        assert worker.ack(job) == [job.id]
        assert worker.fail(job, permanent=True) == [(job.id, "stale", 0)]
        assert worker.extend(job) == [job.id]
        assert worker.hand_back(job) == [job.id]
    assert snapshot(redis_client, queue.keys) == before


def test_a_batch_with_one_stale_token_still_settles_the_valid_ones(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.enqueue_batch("t", range(3))
    worker = ScriptedWorker(redis_url, queue.keys)
    a, b, c = worker.claim(3).jobs
    forged = Claimed(**{**{f: getattr(b, f) for f in Claimed.__slots__}, "token": "w9/1:0"})
    assert worker.ack(a, forged, c) == [b.id]
    census_now = census(redis_client, queue.keys)
    census_now.assert_sound()
    assert census_now.states["leased"] == {b.id}


def test_extend_moves_the_deadline_so_recover_leaves_the_lease_alone(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.enqueue("t")
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=SHORT_TTL_MS)
    [job] = worker.claim().jobs
    assert worker.extend(job, lease_ttl_ms=60_000) == []
    time.sleep(SHORT_TTL_MS * 2 / 1000)
    assert worker.recover() == (0, 0)
    assert worker.ack(job) == []


def test_an_expired_lease_stays_valid_until_recovery_hands_the_job_on(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """A slow worker's late ack still counts while nobody else was given the job."""
    queue.enqueue_batch("t", range(2), backoff=Backoff(0, 0))
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=SHORT_TTL_MS)
    late, lost = worker.claim(2).jobs
    time.sleep(SHORT_TTL_MS * 2 / 1000)
    assert worker.ack(late) == []
    assert worker.recover() == (1, 1)
    assert worker.ack(lost) == [lost.id]
    assert census(redis_client, queue.keys).states["ready"] == {lost.id}


def test_concurrent_recoveries_handle_each_expired_lease_once(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    ids = {e.id for e in queue.enqueue_batch("t", range(60), max_attempts=3)}
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=SHORT_TTL_MS)
    assert len(worker.claim(60).jobs) == 60
    time.sleep(SHORT_TTL_MS * 2 / 1000)

    results = worker.together(lambda lc: lc.recover(worker.classes, 7) for _ in range(12))
    # 12 callers with 7 leases each could take 84: every lease was taken by exactly one of them.
    assert sum(recovered for recovered, _ in results) == 60
    for job_id in ids:
        errors = redis_client.lrange(queue.keys.errors(job_id), 0, -1)
        assert len(errors) == 1, job_id
        assert redis_client.hget(queue.keys.job(job_id), "a") == b"1"
    retried = [event[0] for kind, event in events(redis_client, queue.keys) if kind == "retried"]
    assert sorted(retried) == sorted(ids)
    census(redis_client, queue.keys).assert_sound()


def test_attempts_are_counted_at_claim_and_refunded_on_hand_back(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """INV-4: a drained run costs no attempt; a crashed or failed run does."""
    job_id = queue.enqueue("t", max_attempts=2, backoff=Backoff(0, 0, jitter=False)).id
    queue.enqueue("behind")
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=SHORT_TTL_MS)

    def attempts() -> int:
        return int(redis_client.hget(queue.keys.job(job_id), "a") or 0)

    for _ in range(3):
        [job] = worker.claim().jobs
        assert (job.id, job.attempt, attempts()) == (job_id, 1, 1)
        assert worker.hand_back(job) == []
        # Back at the front of its group, ahead of the job enqueued after it, attempt refunded.
        assert attempts() == 0

    [job] = worker.claim().jobs
    assert (job.id, job.attempt) == (job_id, 1)
    assert expire(worker) == (1, 1)
    # A retry joins the back of its group, behind the job enqueued after it.
    behind, job = worker.claim(2).jobs
    assert (job.id, job.attempt, behind.attempt) == (job_id, 2, 1)
    [(_, outcome, _)] = worker.fail(job)
    assert outcome == "dead"
    assert attempts() == 2


def test_a_job_that_crashes_every_worker_is_dead_lettered_after_max_attempts(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """B04 at script level: every run's lease expires; max_attempts 3, backoff 1 s then 2 s."""
    job_id = queue.enqueue("poison", max_attempts=3, backoff=Backoff(1, 60, jitter=False)).id
    queue.enqueue_batch("normal", range(10))
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=SHORT_TTL_MS)

    starts: list[int] = []
    recovered_at: list[int] = []
    others = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = worker.claim(4)
        for job in result.jobs:
            if job.id == job_id:
                assert job.attempt == len(starts) + 1
                starts.append(result.now_ms)
            else:
                worker.ack(job)
                others += 1
        before_ms = worker.claim(0).now_ms
        recovered, _ = worker.recover()
        if recovered:
            recovered_at.append(before_ms)
        if redis_client.zscore(queue.keys.dead, job_id) is not None:
            break
        time.sleep(0.01)

    assert others == 10
    assert len(starts) == 3
    # Each redelivery waited its backoff after the crash was noticed: 1 s, then 2 s.
    assert len(recovered_at) == 3
    assert starts[1] - recovered_at[0] >= 1000
    assert starts[2] - recovered_at[1] >= 2000
    assert starts[1] - starts[0] <= 1000 + 500
    assert starts[2] - starts[1] <= 2000 + 500

    info = queue.get_job(job_id)
    assert (info.state, info.attempts, info.max_attempts) == ("dead", 3, 3)
    assert info.dead_reason == "worker_lost"
    assert [e["reason"] for e in info.errors] == ["worker_lost"] * 3
    assert [e["attempt"] for e in info.errors] == [1, 2, 3]
    assert {e["worker"] for e in info.errors} == {"w1"}
    # No fourth run: nothing is left to claim or recover.
    assert worker.claim(4).jobs == []
    assert worker.recover() == (0, 0)
    census(redis_client, queue.keys).assert_sound()


def test_a_crashed_job_with_one_attempt_is_dead_lettered_not_dropped(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    job_id = queue.enqueue("t", max_attempts=1).id
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=SHORT_TTL_MS)
    worker.claim()
    assert expire(worker) == (1, 0)
    info = queue.get_job(job_id)
    assert (info.state, info.dead_reason, info.attempts) == ("dead", "worker_lost", 1)
    [stats] = queue.stats(["normal"])
    assert (stats.dead, stats.in_flight, stats.ready) == (1, 0, 0)
    census(redis_client, queue.keys).assert_sound()


def test_the_one_trip_wait_and_claim_reports_an_outage_at_every_step(
    queue: Queue, redis_url: str
) -> None:
    """Redis gone before the connection is made, and gone mid-exchange: both are an outage
    (BackendUnavailable), which the worker rides out; any other exception ends its claimer."""
    keys = queue.keys
    classes = ("normal",)
    wake = [keys.wake(c) for c in classes]

    async def exchange(url: str, kill_first: bool) -> None:
        leases = LeaseClient(redis.asyncio.Redis.from_url(redis_url), keys)
        blocking = redis.asyncio.Redis.from_url(url)
        try:
            if kill_first:
                await leases.wait_then_claim(
                    blocking, wake, 0.05, (1, 30_000, "w/1", classes), lambda _: None
                )
            else:
                waiting = asyncio.Event()
                ids: list[int] = []

                def seen(client_id: int | None) -> None:
                    if client_id is not None:
                        ids.append(client_id)
                        waiting.set()

                async def drop_while_waiting() -> None:
                    await waiting.wait()
                    await leases.client.client_kill_filter(_id=ids[-1])

                killer = asyncio.create_task(drop_while_waiting())
                await leases.wait_then_claim(blocking, wake, 5, (1, 30_000, "w/1", classes), seen)
                await killer
        finally:
            await blocking.aclose()
            await leases.client.aclose()

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(BackendUnavailable):
        asyncio.run(exchange(f"redis://127.0.0.1:{port}/0", kill_first=True))
    with pytest.raises(BackendUnavailable):
        asyncio.run(exchange(redis_url, kill_first=False))
    assert queue.stats(["normal"])[0].in_flight == 0
