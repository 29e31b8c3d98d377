"""Review session 3: attacks on acks riding with claims, the function library, bulk enqueue
encoding, 'queued_run' history records and keys of another type.

Tests whose docstring says "the review found" cover a defect it proved with a failing test
(fixed since); the others cover paths that held up and had no test of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio

from conveyor import scripts
from conveyor.config import QueueConfig, WorkerSettings
from conveyor.errors import ConveyorError
from conveyor.job import JobSpec
from conveyor.keys import PRIORITY_CLASSES
from conveyor.leases import LeaseClient
from conveyor.queue import BATCH_LIMIT, AsyncQueue, Queue, _batches
from conveyor.registry import Registry
from conveyor.schedule import Schedule
from conveyor.worker import Worker
from tests.integration.test_history import history_url, stored_events, write_history
from tests.integration.test_redis_cluster import cluster
from tests.support.invariants import census, snapshot
from tests.support.invariants import events as stream_events
from tests.support.scripted import ScriptedWorker
from tests.support.workers import Ledger, Workers, assert_conserved, wait_until

__all__ = ["cluster", "history_url"]  # fixtures, imported for this module's tests

pytest_plugins = ["tests.support.worker_fixtures"]


def kinds(redis_client: redis.Redis, queue: Queue, kind: str) -> list[list[Any]]:
    return [record for k, record in stream_events(redis_client, queue.keys) if k == kind]


def claim_carrying(worker: ScriptedWorker, acks: list[tuple[str, str, int]]) -> Any:
    """A claim exactly as the worker's claimer sends it: with the buffered acks inside."""
    worker.claims += 1
    prefix = f"{worker.name}/{worker.claims}"
    return worker.call(
        lambda lc: lc.claim(10, worker.lease_ttl_ms, prefix, PRIORITY_CLASSES, acks=acks)
    )


# -- 1. acks riding with claims ------------------------------------------------------------------


def _plant_foreign_key(redis_client: redis.Redis, queue: Queue, where: str) -> None:
    """Something other than Conveyor wrote a key of another type under one of its names."""
    if where == "delayed zset":
        redis_client.set(queue.keys.delayed("low"), "not a zset")
    elif where == "ready zset":
        redis_client.set(queue.keys.ready("low"), "not a zset")
    elif where == "group list":
        queue.enqueue("t", "low job", priority="low", group="g")
        redis_client.delete(queue.keys.group("low", "g"))
        redis_client.hset(queue.keys.group("low", "g"), "not", "a list")
    elif where == "paused set":
        queue.enqueue("t", "low job", priority="low", group="g")
        redis_client.set(queue.keys.paused, "not a set")
    else:
        raise AssertionError(where)


@pytest.mark.parametrize("where", ["delayed zset", "ready zset", "group list", "paused set"])
def test_a_claim_stopped_by_a_foreign_key_still_records_the_acks_it_carried(
    queue: Queue, redis_url: str, redis_client: redis.Redis, where: str
) -> None:
    """claim.lua records the carried acks first (ack_leases), then claims. The review found
    that a claim part failing on a key of another type left the acks applied without their
    'completed' events, and the worker, told the claim failed, sent them again to a 'stale'
    answer (the run counted as lost). Now the claim reports the problem in its reply and the
    acks are settled with their events."""
    job = queue.enqueue("t", 1)
    worker = ScriptedWorker(redis_url, queue.keys)
    (claimed,) = worker.claim(1).jobs
    assert claimed.id == job.id
    _plant_foreign_key(redis_client, queue, where)

    result = claim_carrying(worker, [(claimed.id, claimed.token, 5)])

    assert "WRONGTYPE" in result.problem
    assert result.stale_acks == []
    assert len(kinds(redis_client, queue, "completed")) == 1
    with pytest.raises(ConveyorError):  # gone: done, with no retention configured
        queue.get_job(job.id)
    # The same acks sent again (a lost reply) are stale and change nothing more.
    assert worker.ack(claimed, runtime_ms=5) == [claimed.id]
    assert len(kinds(redis_client, queue, "completed")) == 1


def test_a_claim_that_fails_unexpectedly_gives_its_acks_back_to_the_reporter(
    queue: Queue, redis_url: str
) -> None:
    """The claimer takes the reporter's acks before its claim and owes them back on every
    path, but only ConveyorError (and a drain's cancellation) puts them back. A claim that
    raises anything else (a bug, an exception from the client library that is not a
    RedisError) ends the claimer; the worker drains as designed for a crashed claimer, and the
    reporter, which no longer holds those acks, exits with nothing unreported. Each of those
    jobs completed, yet stayed leased until its lease expired and then ran again (found by
    the review; the claimer now gives its acks back on any exception)."""
    queue.configure(QueueConfig(done_retention=3600))
    registry = Registry()
    finished: list[str] = []

    @registry.task("t")
    async def handler(job: Any) -> None:
        finished.append(job.id)

    settings = WorkerSettings(
        redis_url=redis_url,
        queue=queue.keys.queue,
        concurrency=2,
        claim_batch=2,
        lease_ttl=30,
        grace=1,
        sweep_interval=0.5,
    )
    ids = [e.id for e in queue.enqueue_batch("t", range(6))]
    worker = Worker(settings, registry)
    real_claim = worker.leases.claim
    carried: list[str] = []

    async def claim(*args: Any, acks: Any = None, **kwargs: Any) -> Any:
        if acks:
            carried.extend(job_id for job_id, _, _ in acks)
            raise RuntimeError("simulated bug in the claim path")
        return await real_claim(*args, acks=acks, **kwargs)

    worker.leases.claim = claim  # type: ignore[method-assign]
    try:
        code = asyncio.run(asyncio.wait_for(worker.run(), 30))
    finally:
        worker.threads.shutdown(wait=False, cancel_futures=True)

    assert code == 1  # the claimer's crash drained the process, as designed
    assert carried, "no claim carried acks; the scenario did not happen"
    states = {job_id: queue.get_job(job_id).state for job_id in ids if job_id in finished}
    assert set(states.values()) == {"done"}, (
        f"jobs whose handler finished, by state after the worker exited: {states}"
    )


# -- 5. keys of another type ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["group list", "rate state"])
def test_a_foreign_key_met_mid_claim_costs_no_job_already_popped(
    queue: Queue, redis_url: str, redis_client: redis.Redis, where: str
) -> None:
    """serve() popped and marked active one group's job, then met the next group's list (or
    its rate state) holding another type: the review found the script aborted before the lease
    set's ZADD, leaving the first job 'active' in no structure, lost for good. Now the read is
    guarded: the claim goes on without that key and names the problem in its reply."""
    a = queue.enqueue("t", "a", group="A").id
    b = queue.enqueue("t", "b", group="B").id
    if where == "group list":
        redis_client.delete(queue.keys.group("normal", "B"))
        redis_client.hset(queue.keys.group("normal", "B"), "not", "a list")
    else:
        queue.set_rate_limit("B", 10, 1)
        redis_client.hset(queue.keys.rate("B"), "not", "a number")
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=200)

    result = worker.claim(10)

    assert "WRONGTYPE" in result.problem
    claimed = sorted(job.id for job in result.jobs)
    # A list of another type holds nothing claimable (B's id went with it); a rate state of
    # another type limits nothing.
    assert claimed == ([a] if where == "group list" else sorted([a, b]))
    if where == "group list":
        assert redis_client.zscore(queue.keys.ready("normal"), "B") is None
    assert worker.claim(10).jobs == []
    redis_client.delete(queue.keys.group("normal", "B"))  # the census reads every group list
    found = census(redis_client, queue.keys)
    assert all(found.state_of(job_id) == {"leased"} for job_id in claimed)


def test_an_error_list_of_another_type_costs_no_job_when_it_fails(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """fail_attempt removes the lease first, then RPUSHes the error record: with err:<id> of
    another type the RPUSH aborts fail.lua, leaving the job 'active' with no lease (never
    recovered, never run again). Every failure after it in the same batch is not recorded
    either, and the reporter's retries of the batch fail the same way for ever."""
    queue.enqueue_batch("t", range(2))
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=200)
    first, second = worker.claim(2).jobs
    redis_client.set(queue.keys.errors(first.id), "not a list")

    refusals = 0
    for _ in range(3):  # the reporter retries the same batch
        try:
            worker.fail(first, second)
        except ConveyorError:
            refusals += 1
    time.sleep(0.3)
    worker.recover()
    found = census(redis_client, queue.keys)
    lost = [job.id for job in (first, second) if not found.state_of(job.id)]
    assert (refusals, lost) == (0, []), (
        f"{refusals} of 3 fail calls refused; jobs in no structure: {lost}"
    )


def test_an_error_list_of_another_type_costs_no_job_on_recovery(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """The sweeper's recover.lua goes through the same fail_attempt: an expired lease whose
    job has err:<id> of another type is removed from the lease set, then the script aborts.
    The job stays 'active' in no structure: lost."""
    queue.enqueue("t", 1)
    worker = ScriptedWorker(redis_url, queue.keys, lease_ttl_ms=50)
    (job,) = worker.claim(1).jobs
    redis_client.set(queue.keys.errors(job.id), "not a list")
    time.sleep(0.1)
    for _ in range(2):  # one sweep, then the next one
        with contextlib.suppress(ConveyorError):
            worker.recover()
    found = census(redis_client, queue.keys)
    assert found.state_of(job.id), f"job {job.id} is {found.records.get(job.id)} in no structure"


def test_a_dedup_key_of_another_type_is_replaced_and_refuses_no_batch(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """The review found that a dedup key holding another type aborted enqueue.lua midway: the
    jobs before it kept their records and dedup keys without reaching a group list, so the
    producer's retry was 'deduplicated' against jobs that never ran. Such a key holds no job
    id: the enqueue now replaces it."""
    redis_client.hset(queue.keys.dedup("taken"), "not", "a string")
    specs = [JobSpec("t", "a", dedup_key="a"), JobSpec("t", "b", dedup_key="taken")]
    results = queue.enqueue_many(specs)
    worker = ScriptedWorker(redis_url, queue.keys)
    ran = sorted(job.payload for job in worker.claim(10).jobs)
    assert ([r.created for r in results], ran) == ([True, True], [b'"a"', b'"b"'])
    assert redis_client.get(queue.keys.dedup("taken")) == results[1].id.encode()


def test_an_enqueue_refused_midway_leaves_no_id_for_the_next_enqueue_to_reuse(
    queue: Queue, redis_client: redis.Redis
) -> None:
    """The sequence used to be read at the start of enqueue.lua and written back only at its
    end, while job records were written as the call went: a call that aborted midway (here on
    a group list of another type) left records under ids the next call handed out again, and
    HSET merged the next job into the orphan's record. The numbers are now reserved first.
    Two FCALLs are pipelined so they usually share a millisecond."""
    scripts.load(redis_client)
    redis_client.hset(queue.keys.group("normal", "bad"), "not", "a list")
    (bad,) = _batches([JobSpec("t", "orphan", max_attempts=9, dedup_key="o", group="bad")], 1024)
    (good,) = _batches([JobSpec("t", "innocent")], 1024)
    keys = queue.keys.script_keys
    for _ in range(20):
        pipe = redis_client.pipeline(transaction=False)
        pipe.fcall(scripts.ENQUEUE.function, 1, *keys, *bad.args)
        pipe.fcall(scripts.ENQUEUE.function, 1, *keys, *good.args)
        refused, answer = pipe.execute(raise_on_error=False)
        assert isinstance(refused, redis.ResponseError)
        _, now_ms, first_seq, _ = answer
        record = redis_client.hgetall(queue.keys.job(f"{now_ms:013d}-{first_seq:016d}"))
        assert b"dk" not in record, f"a job enqueued without options carries another's: {record}"
        assert record[b"p"] == b'"innocent"'
        redis_client.delete(queue.keys.dedup("o"))


def test_a_wake_up_key_of_another_type_refuses_no_enqueue(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """finish() RPUSHes the wake-up tokens last; a wake:<class> key of another type (the
    worker's wait treats exactly this as a known case, 'wait_refused') makes every enqueue
    raise after its jobs were stored, queued and counted. A producer retries an enqueue that
    raised: every job runs twice."""
    redis_client.set(queue.keys.wake("normal"), "not a list")
    before = snapshot(redis_client, queue.keys)
    try:
        queue.enqueue("t", 1)
    except ConveyorError:
        refused = True
    else:
        refused = False
    worker = ScriptedWorker(redis_url, queue.keys)
    stored = [job.payload for job in worker.claim(10).jobs]
    assert refused is False or (stored == [] and snapshot(redis_client, queue.keys) == before), (
        f"the enqueue raised, yet {len(stored)} job(s) of it were stored and claimable"
    )


def test_a_group_list_of_another_type_does_not_fail_stats(
    queue: Queue, redis_client: redis.Redis
) -> None:
    """stats.lua LINDEXes the head of each of the first 100 groups' lists, without the pcall
    read_job got: one group list of another type fails every stats call of the queue (CLI
    stats, dashboard, the autoscaler's backlog signal), for every class."""
    queue.enqueue("t", 1, group="ok")
    queue.enqueue("t", 2, group="bad", priority="low")
    redis_client.delete(queue.keys.group("low", "bad"))
    redis_client.hset(queue.keys.group("low", "bad"), "not", "a list")
    try:
        rows = {row.priority: row.ready for row in queue.stats()}
    except ConveyorError as exc:
        rows = {"refused": str(exc)}  # type: ignore[dict-item]
    assert rows.get("normal") == 1, f"stats answered {rows}"


def test_wrong_types_the_scripts_survive(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """Kept as coverage: an err:<id> of another type does not stop an ack (PEXPIRE/UNLINK
    work on any type), and get_job still shows such a job."""
    queue.configure(QueueConfig(done_retention=60))
    queue.enqueue_batch("t", range(2))
    worker = ScriptedWorker(redis_url, queue.keys)
    first, second = worker.claim(2).jobs
    redis_client.set(queue.keys.errors(first.id), "not a list")
    assert queue.get_job(first.id).errors == []
    assert worker.ack(first, second) == []
    assert {queue.get_job(first.id).state, queue.get_job(second.id).state} == {"done"}


# -- 2. the function library -------------------------------------------------------------------


def test_two_queues_of_one_name_under_two_prefixes_share_no_state(
    redis_client: redis.Redis, redis_url: str, queue_name: str
) -> None:
    """The prelude caches key names per base and resets every buffer in begin(): calls for two
    queues interleaved on one server (same name, other prefix; other name, same prefix) keep
    their jobs, sequences, counters and events apart. Passes; kept as coverage."""
    queues = [
        Queue(redis_client, queue_name),
        Queue(redis_client, queue_name, prefix="other"),
        Queue(redis_client, queue_name + "x"),
    ]
    created: dict[int, list[str]] = {i: [] for i in range(3)}
    for round_ in range(3):
        for i, q in enumerate(queues):
            created[i] += [e.id for e in q.enqueue_batch("t", range(round_ + i + 1), group="g")]
            created[i].append(q.enqueue("t", "late", delay=30).id)
    for i, q in enumerate(queues):
        # Ids restart per queue: each queue's sequence is its own.
        assert created[i][0].endswith("-0000000000000000")
        found = census(redis_client, q.keys)
        found.assert_sound()
        assert found.states["ready"] | found.states["delayed"] == set(created[i])
        queued = [r[0] for r in kinds(redis_client, q, "queued")]
        assert sorted(queued) == sorted(created[i])
        worker = ScriptedWorker(redis_url, q.keys)
        assert {j.id for j in worker.claim(100).jobs} == found.states["ready"]


def test_function_flush_between_every_call_of_a_worker_loses_nothing(
    queue: Queue, redis_url: str, redis_client: redis.Redis
) -> None:
    """Every worker-side call (claim with acks, wait-then-claim, extend, fail, hand back,
    recover) finds the library gone and loads it again itself. Passes; kept as coverage."""
    ids = [e.id for e in queue.enqueue_batch("t", range(6))]
    worker = ScriptedWorker(redis_url, queue.keys)
    a, b, c = worker.claim(3).jobs
    redis_client.function_flush()
    carried = claim_carrying(worker, [(a.id, a.token, 1)])
    assert carried.stale_acks == []
    assert len(carried.jobs) == 3
    redis_client.function_flush()
    assert worker.extend(b) == []
    redis_client.function_flush()
    assert worker.fail(b, permanent=True)[0][1] == "dead"
    redis_client.function_flush()
    assert worker.hand_back(c) == []
    redis_client.function_flush()
    worker.recover()
    redis_client.function_flush()

    async def wait_then_claim(lc: LeaseClient) -> Any:
        blocking = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await lc.wait_then_claim(
                blocking,
                [queue.keys.wake(p) for p in PRIORITY_CLASSES],
                0.05,
                (10, 10_000, "w1/99", PRIORITY_CLASSES),
                lambda _: None,
            )
        finally:
            await blocking.aclose()

    # The one-trip wait reports the missing library as None; the plain claim then loads it.
    assert worker.call(wait_then_claim) is None
    rest = worker.claim(10).jobs
    assert {j.id for j in rest} == {c.id}
    assert len(kinds(redis_client, queue, "completed")) == 1
    assert len(ids) == 6


# -- 3. bulk enqueue encoding ------------------------------------------------------------------


def test_enqueue_batch_from_a_generator_that_raises_after_a_full_batch_stores_nothing(
    queue: Queue, redis_client: redis.Redis
) -> None:
    """Passes; kept as coverage: the builder encodes every chunk before the first is sent."""

    def payloads() -> Iterator[int]:
        yield from range(BATCH_LIMIT + 5)
        raise RuntimeError("producer failed")

    before = snapshot(redis_client, queue.keys)
    with pytest.raises(RuntimeError):
        queue.enqueue_batch("t", payloads())
    assert snapshot(redis_client, queue.keys) == before

    async def produce() -> None:
        client = redis.asyncio.Redis(port=redis_client.connection_pool.connection_kwargs["port"])
        try:
            await AsyncQueue(client, queue.keys.queue).enqueue_batch("t", payloads())
        finally:
            await client.aclose()

    with pytest.raises(RuntimeError):
        asyncio.run(produce())
    assert snapshot(redis_client, queue.keys) == before


def test_mixed_runs_across_the_batch_limit_keep_order_dedup_and_one_queued_event_each(
    queue: Queue, redis_client: redis.Redis
) -> None:
    """Runs with and without dedup keys, a key repeated across the BATCH_LIMIT boundary and a
    key on the last job of the first call and the first of the second. Passes; coverage."""
    specs = [JobSpec("t", i) for i in range(BATCH_LIMIT + 6)]
    specs[3] = JobSpec("t", 3, dedup_key="across")
    specs[BATCH_LIMIT - 1] = JobSpec("t", BATCH_LIMIT - 1, dedup_key="edge1")
    specs[BATCH_LIMIT] = JobSpec("t", BATCH_LIMIT, dedup_key="edge2")
    specs[BATCH_LIMIT + 1] = JobSpec("t", BATCH_LIMIT + 1, dedup_key="across")
    specs[BATCH_LIMIT + 2] = JobSpec("t", BATCH_LIMIT + 2, priority="high")
    specs[BATCH_LIMIT + 3] = JobSpec("u", BATCH_LIMIT + 3, dedup_key="edge1")
    results = queue.enqueue_many(specs)
    assert len(results) == len(specs)
    duplicates = [i for i, r in enumerate(results) if not r.created]
    assert duplicates == [BATCH_LIMIT + 1, BATCH_LIMIT + 3]
    assert results[BATCH_LIMIT + 1].id == results[3].id
    assert results[BATCH_LIMIT + 3].id == results[BATCH_LIMIT - 1].id
    created = [r.id for r in results if r.created]
    assert len(set(created)) == len(created) == len(specs) - 2
    for i in (0, 3, BATCH_LIMIT - 1, BATCH_LIMIT, BATCH_LIMIT + 2, BATCH_LIMIT + 5):
        assert redis_client.hget(queue.keys.job(results[i].id), "p") == str(i).encode()
    queued = Counter(r[0] for r in kinds(redis_client, queue, "queued"))
    assert queued == Counter(created)
    census(redis_client, queue.keys).assert_sound()


# -- 4. 'queued_run' records and history ---------------------------------------------------------


def test_history_stores_exactly_one_queued_row_per_created_job(
    queue: Queue, redis_client: redis.Redis, redis_url: str, history_url: str
) -> None:
    """Dedup hits inside runs, delayed jobs between ready ones, type and class changes, a
    schedule tick, a replay and a hand-back (neither is 'queued'). Passes; kept as coverage."""
    first = queue.enqueue("t", "first", dedup_key="k")
    later = datetime.now(UTC) + timedelta(hours=1)
    specs = [
        JobSpec("t", 0),
        JobSpec("t", 1, dedup_key="k"),  # deduplicated: no sequence number, no row
        JobSpec("t", 2),
        JobSpec("t", 3, delay=60),
        JobSpec("t", 4),
        JobSpec("u", 5),
        JobSpec("u", 6, priority="low"),
        JobSpec("u", 7, priority="low", run_at=later),
        JobSpec("u", 8, priority="low", dedup_key="m"),
        JobSpec("u", 9, priority="low", dedup_key="m"),  # same call: deduplicated
    ]
    results = queue.enqueue_many(specs)
    results += queue.enqueue_batch("v", range(2500), group="g")
    schedule = Schedule("tick", "* * * * *", "w")
    tick = schedule.latest_tick(datetime.now(UTC))
    sid, made = scripts.SCHEDULE.run(
        redis_client, queue.keys.script_keys, schedule.script_args(tick)
    )
    assert made == 1
    worker = ScriptedWorker(redis_url, queue.keys)
    claimed = worker.claim(2).jobs
    worker.fail(claimed[0], permanent=True)
    queue.replay([claimed[0].id])
    worker.hand_back(claimed[1])

    created = [first.id, *(r.id for r in results if r.created), sid.decode()]
    write_history(redis_url, queue, history_url)
    queued_rows = Counter(
        job_id for _, _, _, job_id, kind in stored_events(history_url, queue) if kind == "queued"
    )
    assert queued_rows == Counter(created)
    census(redis_client, queue.keys).assert_sound()


def test_ids_and_queued_rows_stay_exact_just_below_two_to_the_53(
    queue: Queue, redis_client: redis.Redis, redis_url: str, history_url: str
) -> None:
    """A sequence of 16 digits (the last ids below 2**53): ids, the reply's id range, the
    'queued_run' record and its expansion in history agree. Passes; kept as coverage."""
    start = 2**53 - 6
    redis_client.set(queue.keys.base + "seq", start)
    results = queue.enqueue_batch("t", range(5))
    assert [r.id.split("-")[1] for r in results] == [f"{s:016d}" for s in range(start, start + 5)]
    for r in results:
        assert redis_client.exists(queue.keys.job(r.id))
    write_history(redis_url, queue, history_url)
    rows = [
        job_id for _, _, _, job_id, kind in stored_events(history_url, queue) if kind == "queued"
    ]
    assert sorted(rows) == sorted(r.id for r in results)


def test_an_enqueue_past_two_to_the_53_is_refused_and_stores_nothing(
    queue: Queue, redis_client: redis.Redis
) -> None:
    """The sequence is a Lua double: from 2**53 on, two jobs of one call got one id (found by
    the review). Such an enqueue is now refused with a clear error before it writes a job."""
    redis_client.set(queue.keys.base + "seq", 2**53 - 1)
    before = census(redis_client, queue.keys)
    with pytest.raises(ConveyorError, match="sequence exhausted"):
        queue.enqueue_batch("t", range(4))
    assert census(redis_client, queue.keys).records == before.records


def test_function_flush_on_every_cluster_primary_is_repaired_by_the_next_call(
    cluster: Any,
) -> None:
    """FUNCTION LOAD from a cluster client reaches every primary (redis-py routes it to all of
    them), so a cluster that lost the library gets it back. Passes; kept as coverage."""
    cluster.function_flush()
    queue = Queue(cluster, "flushed")
    assert queue.enqueue("t", 1).created
    cluster.function_flush()
    raw = scripts.CLAIM.run(
        cluster,
        queue.keys.script_keys,
        [10, 30_000, "w/1", len(PRIORITY_CLASSES), *PRIORITY_CLASSES],
    )
    assert [row[4] for row in raw[4:]] == [b"1"]


def test_function_flush_again_and_again_under_live_workers_loses_and_repeats_no_job(
    workers: Workers, tracked: Queue, job_ledger: Ledger, redis_client: redis.Redis
) -> None:
    """Two busy worker processes (claims carrying acks, one-trip waits, heartbeats, sweeps)
    while the library is flushed every few milliseconds. Passes; kept as coverage."""
    workers.start(concurrency=8)
    workers.start(concurrency=3, claim_batch=2)
    ids: list[str] = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        redis_client.function_flush()
        ids += [r.id for r in tracked.enqueue_batch("noop", ({"i": i} for i in range(20)))]
        redis_client.function_flush()
        time.sleep(0.01)
    job_ledger.wait_rows(len(ids), timeout=30, outcome="ok")
    wait_until(lambda: all(tracked.get_job(i).state == "done" for i in ids), 10, "acks")
    rows = job_ledger.rows(outcome="ok")
    assert sorted(r["job_id"] for r in rows) == sorted(ids)
    assert {tracked.get_job(i).attempts for i in ids} == {1}
    assert_conserved(redis_client, tracked.keys.queue, ids)
    for worker in workers.started:
        assert not worker.logs(event="claimer_crashed")
