"""Which job a claim hands out: strict priority between classes, FIFO inside a group, groups
taking turns, and nothing waiting behind a job that cannot run yet (B18, B20, B21)."""

from __future__ import annotations

import itertools
import time

import redis

from conveyor.job import Backoff
from conveyor.keys import PRIORITY_CLASSES
from conveyor.queue import Queue
from tests.support.invariants import census
from tests.support.scripted import ScriptedWorker


def types_of(worker: ScriptedWorker, n: int) -> list[str]:
    return [job.type or "" for job in worker.claim(n).jobs]


def test_classes_are_served_in_strict_priority_order(queue: Queue, redis_url: str) -> None:
    for priority in reversed(PRIORITY_CLASSES):
        queue.enqueue(priority, priority=priority)
        queue.enqueue(priority, priority=priority)
    worker = ScriptedWorker(redis_url, queue.keys)
    assert types_of(worker, 3) == ["critical", "critical", "high"]
    assert types_of(worker, 1) == ["high"]
    assert types_of(worker, 10) == ["normal", "normal", "low", "low"]


def test_jobs_of_one_group_come_out_in_enqueue_order(queue: Queue, redis_url: str) -> None:
    ids = [e.id for e in queue.enqueue_batch("t", range(30), group="g")]
    ids += [queue.enqueue("t", 30, group="g").id]
    worker = ScriptedWorker(redis_url, queue.keys)
    claimed = worker.claim_ids(7) + worker.claim_ids(1) + worker.claim_ids(100)
    assert claimed == ids


def test_a_huge_export_does_not_take_every_slot_from_other_groups(
    queue: Queue, redis_url: str
) -> None:
    queue.enqueue_batch("export", range(10_000), group="tenant-a", priority="low")
    queue.enqueue_batch("web", range(5), group="tenant-b", priority="low")
    worker = ScriptedWorker(redis_url, queue.keys)

    first = types_of(worker, 10)
    assert first == ["export", "web"] * 5

    # A group that shows up while the export is running is served on the next turn.
    queue.enqueue_batch("report", range(3), group="tenant-c", priority="low")
    assert types_of(worker, 6) == ["export", "report", "export", "report", "export", "report"]
    assert types_of(worker, 4) == ["export"] * 4


def test_groups_keep_their_turns_across_separate_claims(queue: Queue, redis_url: str) -> None:
    for group in ("a", "b", "c"):
        queue.enqueue_batch(group, range(3), group=group)
    worker = ScriptedWorker(redis_url, queue.keys)
    assert [t for _ in range(9) for t in types_of(worker, 1)] == ["a", "b", "c"] * 3


def test_a_worker_bound_to_some_classes_leaves_the_others_alone(
    queue: Queue, redis_url: str
) -> None:
    queue.enqueue("urgent", priority="critical")
    queue.enqueue("slow", priority="low", delay=3600)
    low_worker = ScriptedWorker(redis_url, queue.keys, classes=("low", "normal"))
    result = low_worker.claim(10)
    assert result.jobs == []
    # It sleeps until its own next job, not the critical one it will never take.
    assert result.next_ms >= result.now_ms + 3_500_000

    queue.enqueue("bulk", priority="low")
    assert types_of(low_worker, 10) == ["bulk"]
    assert types_of(ScriptedWorker(redis_url, queue.keys, classes=("critical",)), 10) == ["urgent"]


def test_a_delayed_critical_job_does_not_hold_back_ready_work(queue: Queue, redis_url: str) -> None:
    queue.enqueue("later", priority="critical", delay=3600)
    queue.enqueue("now", priority="normal")
    queue.enqueue("now-low", priority="low")
    assert types_of(ScriptedWorker(redis_url, queue.keys), 5) == ["now", "now-low"]


def test_a_short_delay_is_not_stuck_behind_an_earlier_long_one(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """B18: A delay=6h, then B delay=2s, then C delay=0."""
    worker = ScriptedWorker(redis_url, queue.keys)
    a = queue.enqueue("A", delay=6 * 3600).id
    # The worker goes to sleep on A's due time before B arrives.
    idle = worker.claim(4)
    assert idle.jobs == []
    assert idle.next_ms == int(redis_client.zscore(queue.keys.delayed("normal"), a) or 0)
    b = queue.enqueue("B", delay=2).id
    queue.enqueue("C")
    b_created_ms = int(redis_client.hget(queue.keys.job(b), "ct") or 0)

    first = worker.claim(4)
    assert [job.type for job in first.jobs] == ["C"]
    assert first.now_ms - b_created_ms < 200
    # The claim tells the worker to wake for B, not for A.
    assert first.next_ms == b_created_ms + 2000

    time.sleep(max(0, (first.next_ms - first.now_ms) / 1000 - 0.3))
    early = worker.claim(4)
    assert early.jobs == [], f"B came out {early.next_ms - early.now_ms} ms early"
    while True:
        result = worker.claim(4)
        if result.jobs:
            break
        assert result.now_ms - b_created_ms < 2500, "B was not claimable 2.5 s after enqueue"
        time.sleep(0.01)
    assert [job.type for job in result.jobs] == ["B"]
    assert 2000 <= result.now_ms - b_created_ms <= 2500
    # A stays put until its own time, and is still the next thing to wake for.
    assert result.next_ms == int(redis_client.zscore(queue.keys.delayed("normal"), a) or 0)
    assert result.next_ms - b_created_ms > 6 * 3600 * 1000 - 10_000
    assert census(redis_client, queue.keys).state_of(a) == {"delayed"}


def test_a_rate_limited_group_keeps_only_its_own_jobs_waiting(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """B20 at script level: A limited to 1 per 10 s; B-E unlimited, enqueued after A."""
    queue.set_rate_limit("A", 1, 10)
    a_ids = [e.id for e in queue.enqueue_batch("A", range(100), group="A")]
    for group in "BCDE":
        queue.enqueue_batch(group, range(100), group=group)
    worker = ScriptedWorker(redis_url, queue.keys)

    claimed: list[str] = []
    while True:
        result = worker.claim(10)
        if not result.jobs:
            break
        assert len(result.jobs) == 10 or len(claimed) + len(result.jobs) == 401
        claimed += [job.group for job in result.jobs]
        worker.ack(*result.jobs)

    # All of B-E drained in 41 claims; A ran once and its next job alone waits, for A's window.
    assert len(claimed) == 401
    assert claimed.count("A") == 1
    assert claimed[0] == "A"
    assert sorted(set(claimed)) == ["A", "B", "C", "D", "E"]
    assert result.next_ms > result.now_ms + 8_000
    [stats] = queue.stats(["normal"])
    assert (stats.ready, stats.limited_groups, stats.in_flight) == (99, 1, 0)
    remaining = redis_client.lrange(queue.keys.group("normal", "A"), 0, -1)
    assert remaining == [job_id.encode() for job_id in a_ids[1:]]


def test_a_rate_limited_group_runs_fifo_as_each_window_opens_despite_a_backlog(
    queue: Queue, redis_url: str
) -> None:
    """B20's other half: when A's window opens, A's next job is the next one claimed, not one
    queued behind the thousands of B jobs that arrived meanwhile."""
    queue.set_rate_limit("A", 1, 0.4)
    a_ids = [e.id for e in queue.enqueue_batch("A", range(4), group="A")]
    queue.enqueue_batch("B", range(2000), group="B")
    worker = ScriptedWorker(redis_url, queue.keys)

    a_starts: list[tuple[str, int]] = []
    b_claims = 0
    deadline = time.monotonic() + 10
    while len(a_starts) < 4 and time.monotonic() < deadline:
        # One slot: a job at a time, every few milliseconds.
        result = worker.claim(1)
        for job in result.jobs:
            if job.group == "A":
                a_starts.append((job.id, result.now_ms))
            else:
                b_claims += 1
        time.sleep(0.003)
    assert [job_id for job_id, _ in a_starts] == a_ids
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(a_starts)]
    # Never early; late only by one poll on a loaded machine.
    assert all(400 <= gap <= 700 for gap in gaps), gaps
    # B kept the slot busy between A's windows.
    assert b_claims >= 30


def test_a_paused_group_does_not_block_others_and_resumes_in_order(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    paused_ids = [e.id for e in queue.enqueue_batch("p", range(3), group="paused")]
    queue.pause_group("paused")
    queue.enqueue_batch("o", range(3), group="other")
    worker = ScriptedWorker(redis_url, queue.keys)

    assert types_of(worker, 10) == ["o", "o", "o"]
    assert worker.claim(10).jobs == []
    queue.enqueue("p", 3, group="paused")
    assert worker.claim(10).jobs == []
    assert queue.stats(["normal"])[0].ready == 4
    census(redis_client, queue.keys).assert_sound()

    assert queue.resume_group("paused") is True
    assert queue.resume_group("paused") is False
    claimed = worker.claim_ids(10)
    assert claimed[:3] == paused_ids
    assert len(claimed) == 4


def test_a_group_paused_with_nothing_queued_resumes_with_its_later_jobs(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    queue.pause_group("g")
    queue.enqueue("t", group="g", priority="high")
    queue.enqueue("t", group="g", priority="low")
    worker = ScriptedWorker(redis_url, queue.keys)
    assert worker.claim(10).jobs == []
    queue.resume_group("g")
    assert [job.priority for job in worker.claim(10).jobs] == ["high", "low"]
    census(redis_client, queue.keys).assert_sound()


def test_a_retried_critical_job_comes_back_before_the_low_backlog(
    queue: Queue, redis_url: str
) -> None:
    """B21 (a) at script level: one slot; 200 low jobs; critical C fails once, backoff 1 s."""
    queue.enqueue_batch("low", range(200), priority="low")
    c = queue.enqueue("C", priority="critical", backoff=Backoff(1, 1, jitter=False)).id
    worker = ScriptedWorker(redis_url, queue.keys)

    [first] = worker.claim(1).jobs
    assert first.id == c
    [(_, outcome, delay)] = worker.fail(first)
    assert (outcome, delay) == ("retry", 1000)
    due_ms = worker.claim(0).now_ms + 1000  # an upper bound: the fail ran before this claim

    served = 0
    while True:
        result = worker.claim(1)
        [job] = result.jobs
        if job.id == c:
            break
        assert result.now_ms < due_ms, "a low job was claimed after C's retry was due"
        worker.ack(job)
        served += 1
        time.sleep(0.02)
    assert job.attempt == 2
    assert result.now_ms - due_ms <= 100
    assert 10 <= served < 200


def test_under_a_rate_limit_ready_jobs_start_in_class_order(queue: Queue, redis_url: str) -> None:
    """B21 (b): a default limit of 10/s; jobs of every class ready at once, lowest enqueued
    first; the limit holds most of them back, yet they still start critical first."""
    queue.set_rate_limit("*", 10, 1)
    for priority in reversed(PRIORITY_CLASSES):
        for group in ("g1", "g2"):
            queue.enqueue_batch(priority, range(5), priority=priority, group=group)
    worker = ScriptedWorker(redis_url, queue.keys)

    started: list[str] = []
    deadline = time.monotonic() + 15
    while len(started) < 40 and time.monotonic() < deadline:
        result = worker.claim(40)
        started += [job.priority for job in result.jobs]
        time.sleep(0.02)
    assert started == [p for p in PRIORITY_CLASSES for _ in range(10)]


def test_a_limit_value_conveyor_did_not_write_limits_nothing(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """A foreign 'ten a second' (or a zero count) under the limits hash used to fail every
    claim that reached the group: the queue stalled behind it."""
    redis_client.hset(queue.keys.limits, mapping={"acme": "ten a second", "*": "0:1000"})
    queue.enqueue_batch("t", range(3), group="acme")
    queue.enqueue_batch("t", range(2), group="other")
    worker = ScriptedWorker(redis_url, queue.keys)
    assert sorted(job.group for job in worker.claim(10).jobs) == ["acme"] * 3 + ["other"] * 2


def test_a_changed_limit_applies_at_once_to_a_group_already_held_back(
    queue: Queue, redis_url: str
) -> None:
    """A group deferred under a limit of 1 per minute would wait out that minute after the
    limit was raised or cleared; the change moves it back to now."""
    queue.set_rate_limit("A", 1, 60)
    queue.set_rate_limit("*", 1, 60)
    queue.enqueue_batch("A", range(3), group="A")
    queue.enqueue_batch("B", range(3), group="B")
    worker = ScriptedWorker(redis_url, queue.keys)
    assert sorted(types_of(worker, 10)) == ["A", "B"]
    assert types_of(worker, 10) == []

    queue.set_rate_limit("A", 100, 1)
    assert types_of(worker, 10) == ["A", "A"]
    # The default's change releases B, which it governs; A has a limit of its own.
    queue.set_rate_limit("A", 1, 60)
    queue.enqueue("A", 3, group="A")
    assert types_of(worker, 10) == []
    queue.clear_rate_limit("*")
    assert types_of(worker, 10) == ["B", "B"]
    queue.exempt_from_rate_limit("A")
    assert types_of(worker, 10) == ["A"]


def test_a_job_key_of_another_type_is_filed_as_a_dead_letter_and_costs_no_other_job(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """Something else overwrote two jobs' records with other types: a ready one in the middle
    of a group, a delayed one due now. A read error used to abort the claim after its pops:
    the ids popped with the bad one were lost, and the delayed one failed every claim."""
    ids = [e.id for e in queue.enqueue_batch("t", range(5), group="g")]
    later = queue.enqueue("t", "later", delay=0.05).id
    redis_client.set(queue.keys.job(ids[2]), "not a hash")
    redis_client.delete(queue.keys.job(later))
    redis_client.rpush(queue.keys.job(later), "a list")
    time.sleep(0.1)
    worker = ScriptedWorker(redis_url, queue.keys)

    claimed = worker.claim(10)
    assert sorted(job.id for job in claimed.jobs) == sorted([*ids[:2], *ids[3:]])
    worker.ack(*claimed.jobs)
    assert worker.claim(10).jobs == []
    dead = {info.id: info for info in queue.dead_letters()}
    assert set(dead) == {ids[2], later}
    assert {(d.state, d.dead_reason) for d in dead.values()} == {("unreadable", "invalid_job")}
    assert queue.stats(["normal"])[0].dead == 2
    # Nothing to replay in it; purge deletes it for good.
    assert queue.replay([ids[2]]).replayed == 0
    assert queue.purge([ids[2], later]) == 2
    assert not redis_client.exists(queue.keys.job(ids[2]), queue.keys.job(later))
    assert queue.stats(["normal"])[0].dead == 0
