"""B26 and issue 3 §3: workers and producers on a Sentinel-managed Redis ride out a failover.

The set is real (``tests.support.sentinel``: a primary, a replica and three sentinels, all
redis-server processes on loopback) and so are the workers: ``conveyor worker`` processes
given only the ``redis+sentinel://`` URL (the sentinels set comes first in each signature, so
that it outlives the workers). ``SENTINEL FAILOVER`` promotes the replica within a second or
two, but the old primary goes on acting as one until the sentinels demote it and close its
client connections, about ten seconds later with Redis 7.0: clients with a connection open to
it keep using it until then. The tests run through that window; each takes under 30 s here.

What "accepted" needs: replication is asynchronous, so a job the primary acknowledged can be
lost with it. Producers here use ``Queue(..., wait_for_replicas=1)``: an enqueue returns only
once the replica holds the job (``WAIT 1``), and Sentinel promotes that replica. Nothing on
the server side is needed for this (no ``min-replicas-to-write``, no AOF: a failover is not
a restart).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import orjson
import pytest

from conveyor.config import QueueConfig
from conveyor.connection import connect, connect_async
from conveyor.errors import BackendError, BackendUnavailable
from conveyor.queue import AsyncQueue, Queue
from tests.support.sentinel import SentinelSet, sentinel_set
from tests.support.workers import (
    Ledger,
    WorkerProcess,
    Workers,
    assert_conserved,
    cpu_seconds,
    redis_clients_of,
    wait_until,
)

pytest_plugins = ["tests.support.worker_fixtures"]


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    with sentinel_set() as members:
        yield members


@pytest.fixture
def ha_queue(sentinels: SentinelSet, queue_name: str) -> Iterator[Queue]:
    """The test's queue through the Sentinel URL, keeping finished records for the census."""
    queue = Queue.from_url(sentinels.url(), queue_name)
    queue.configure(QueueConfig(done_retention=3600))
    assert queue.client.wait(1, 5000) == 1, "the replica did not get the queue's config"
    yield queue
    queue.client.close()


def _warnings(worker: WorkerProcess, pid: int) -> list[str]:
    return [e.get("event", e["message"]) for e in worker.logs(level="WARNING", pid=pid)]


def test_idle_workers_follow_a_failover_quietly_and_run_what_comes_next(
    sentinels: SentinelSet, workers: Workers, ha_queue: Queue, job_ledger: Ledger
) -> None:
    pool = [workers.start(redis_url=sentinels.url()) for _ in range(2)]
    processes = {w.child(): w for w in pool}
    time.sleep(1.0)  # both idle, blocked on their wake-up lists
    before = {pid: _warnings(w, pid) for pid, w in processes.items()}
    cpu_before = {pid: cpu_seconds(pid) for pid in processes}

    began = time.monotonic()
    old, new = sentinels.failover()
    switched = time.monotonic() - began
    # A fresh client asks the sentinels, so the jobs go to the new primary at once.
    producer = Queue.from_url(sentinels.url(), ha_queue.keys.queue)
    jobs = [r.id for r in producer.enqueue_batch("noop", ({"i": i} for i in range(100)))]
    wait_until(
        lambda: len({r["job_id"] for r in job_ledger.rows(outcome="ok")} & set(jobs)) == 100,
        30 - (time.monotonic() - began),
        "all 100 jobs to run within 30 s of the failover",
    )
    elapsed = time.monotonic() - began
    cpu_share = {pid: (cpu_seconds(pid) - cpu_before[pid]) / elapsed for pid in processes}
    producer.client.close()
    print(
        f"B26 sentinel: switch {switched:.1f}s after SENTINEL FAILOVER, 100 jobs done "
        f"{elapsed:.1f}s after it; worker CPU {', '.join(f'{s:.1%}' for s in cpu_share.values())}"
    )

    assert max(cpu_share.values()) < 0.15, "a worker spun while following the failover"
    with sentinels.client(new) as new_primary, sentinels.client(old) as old_primary:
        # The jobs may have run before the old primary was demoted (a worker that opens a
        # connection asks the sentinels, and its pool then drops the idle ones): wait for it.
        wait_until(
            lambda: (
                old_primary.info("replication")["role"] == "slave"
                and not any(redis_clients_of(old_primary, pid) for pid in processes)
            ),
            20,
            "the old primary's demotion and the workers' last connection to it to close",
        )
        for pid, worker in processes.items():
            assert worker.child() == pid, "a worker process was replaced"
            during = _warnings(worker, pid)[len(before[pid]) :]
            print(f"worker {pid} warnings during the failover: {during}")
            # redis-py retries a command that met the demoted primary on the new one, so the
            # worker's own loops may never see an error: the move itself is what is logged.
            assert during.count("redis_primary_changed") == 1, during
            assert during.count("redis_unreachable") <= 1, during
            assert len(during) <= 2, f"more than one warning for one failover: {during}"
            assert redis_clients_of(new_primary, pid), f"worker {pid} is not on the new primary"
        assert_conserved(new_primary, ha_queue.keys.queue, jobs)
    assert len(job_ledger.rows()) == 100, "a job ran twice though no worker was busy"


@dataclass
class Producer:
    """Enqueues small batches until stopped; keeps what it was told was accepted."""

    url: str
    queue: str
    name: str
    accepted: dict[str, dict[str, object]] = field(default_factory=dict)
    accepted_at: list[float] = field(default_factory=list)
    refused: int = 0
    errors: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        queue = Queue(
            connect(self.url, socket_timeout=5, socket_connect_timeout=2),
            self.queue,
            wait_for_replicas=1,
            replica_timeout=0.5,
        )
        n = 0
        try:
            while not stop.is_set():
                payloads = [{"producer": self.name, "n": n + i} for i in range(5)]
                try:
                    results = queue.enqueue_batch("noop", payloads)
                except BackendError as exc:
                    self.refused += 1
                    if len(self.errors) < 5:
                        self.errors.append(str(exc))
                    time.sleep(0.05)
                    continue
                now = time.monotonic()
                for result, payload in zip(results, payloads, strict=True):
                    self.accepted[result.id] = payload
                    self.accepted_at.append(now)
                n += len(payloads)
                time.sleep(0.01)
        finally:
            queue.client.close()


def test_a_failover_mid_run_loses_no_job_a_producer_was_told_was_accepted(
    sentinels: SentinelSet, workers: Workers, ha_queue: Queue, job_ledger: Ledger
) -> None:
    for _ in range(2):
        workers.start(redis_url=sentinels.url())
    producers = [Producer(sentinels.url(), ha_queue.keys.queue, f"p{i}") for i in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=p.run, args=(stop,), name=p.name) for p in producers]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(len(p.accepted) for p in producers) >= 200, 15, "a busy queue")
        began = time.monotonic()
        old, new = sentinels.failover()
        # Keep producing through the whole window: until the old primary is demoted and
        # replicates the new one, and the new one has accepted work since.
        with sentinels.client(old) as old_primary:
            wait_until(
                lambda: old_primary.info("replication").get("master_link_status") == "up",
                30,
                "the old primary to replicate the new one",
            )
        rejoined = time.monotonic()
        wait_until(
            lambda: sum(1 for p in producers for t in p.accepted_at if t > rejoined) >= 100,
            15,
            "producers to be accepted again",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    accepted = {job_id: payload for p in producers for job_id, payload in p.accepted.items()}
    times = sorted(t for p in producers for t in p.accepted_at)
    stall = max(b - a for a, b in pairwise(times))
    refused = sum(p.refused for p in producers)

    def states() -> dict[str, bytes | None]:
        pipe = ha_queue.client.pipeline(transaction=False)
        for job_id in accepted:
            pipe.hget(ha_queue.keys.job(job_id), "s")
        return dict(zip(accepted, pipe.execute(), strict=True))

    # The old primary has resynced from the new one: a record missing now is gone for good.
    lost = [job_id for job_id, state in states().items() if state is None]
    assert not lost, f"{len(lost)} accepted jobs lost in the failover: {lost[:10]}"
    wait_until(
        lambda: set(states().values()) == {b"done"},
        30,
        "every accepted job to be done on the new primary",
    )
    drained = time.monotonic() - began
    workers.stop_all()

    runs = job_ledger.rows(outcome="ok")
    ran = {r["job_id"] for r in runs}
    print(
        f"failover mid-run: {len(accepted)} accepted, {refused} enqueues refused "
        f"(not replicated or primary unreachable), longest stretch with nothing accepted "
        f"{stall:.1f}s, old primary replicating again {rejoined - began:.1f}s and all "
        f"accepted jobs done {drained:.1f}s after SENTINEL FAILOVER; "
        f"{len(runs)} runs for {len(ran)} jobs"
    )
    with sentinels.client(new) as new_primary:
        assert new_primary.info("replication")["role"] == "master"
        census = assert_conserved(new_primary, ha_queue.keys.queue, accepted)
        assert set(accepted) <= census.states["done"]
        # The record on the new primary is the accepted job itself, not an id reused.
        for job_id, payload in list(accepted.items())[:: max(1, len(accepted) // 50)]:
            assert orjson.loads(ha_queue.get_job(job_id).payload) == payload
    assert set(accepted) <= ran, f"accepted jobs never run: {sorted(set(accepted) - ran)[:10]}"
    assert not [e for p in producers for e in p.errors if "Redis error" in e], [
        p.errors for p in producers
    ]


def test_an_unreplicated_enqueue_is_refused_not_reported_accepted(
    sentinels: SentinelSet, queue_name: str
) -> None:
    primary = sentinels.primary_port()
    replica = next(n for n in sentinels.nodes if n.port != primary)
    assert replica.process is not None
    queue = Queue.from_url(sentinels.url(), queue_name, wait_for_replicas=1, replica_timeout=0.3)

    async def enqueue_async() -> str:
        client = connect_async(sentinels.url())
        try:
            queue = AsyncQueue(client, queue_name, wait_for_replicas=1, replica_timeout=0.3)
            return (await queue.enqueue("noop")).id
        finally:
            await client.aclose()

    try:
        assert queue.enqueue("noop").created
        assert asyncio.run(enqueue_async())
        # A frozen replica cannot acknowledge: the primary stores the job but cannot vouch
        # for it. Shorter than the sentinels' down-after, so no failover starts.
        replica.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(BackendUnavailable, match=r"reached 0 of 1 replicas within 0\.3s"):
                queue.enqueue("noop")
            with pytest.raises(BackendUnavailable, match=r"reached 0 of 1 replicas"):
                asyncio.run(enqueue_async())
        finally:
            replica.process.send_signal(signal.SIGCONT)
        assert queue.enqueue("noop").created
    finally:
        queue.client.close()
