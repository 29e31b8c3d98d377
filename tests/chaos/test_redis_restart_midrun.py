"""Issue 3 §2: Redis restarted mid-run, with producers enqueueing and workers running.

Redis runs with ``appendonly yes`` and ``appendfsync everysec``. A producer thread enqueues one
job per call and notes when each call was acknowledged; workers run them; Redis is stopped,
kept down for a second and started again on the same directory, so it reloads its AOF.

Stopped with SIGTERM, Redis writes and fsyncs the AOF before exiting: every acknowledged
enqueue must survive. Stopped with SIGKILL, Redis gets no say; ``everysec`` promises that no
more than the last second is lost, so every enqueue acknowledged more than a second before the
kill must survive, and the test reports how many of the last second did. (A process kill leaves
the kernel's page cache intact, so on this machine even those normally survive; the promise is
about power loss, which a test cannot stage.) In both cases the workers reconnect by
themselves, in the same processes, and run every surviving job.

``tests/chaos/test_redis_outage.py`` covers a restart while no producer runs (B26); this
module adds the producers and the durability window.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from conveyor.errors import ConveyorError
from conveyor.local import RedisServer
from conveyor.queue import Queue
from tests.support.workers import Ledger, Workers, assert_conserved, wait_until

pytest_plugins = ["tests.support.worker_fixtures"]

BEFORE, DOWN, AFTER = 3.0, 1.0, 3.0
"""Seconds of production before the stop, of outage, and after the restart."""
WINDOW = 1.0
"""``appendfsync everysec``: what a kill may take with it."""


class Producer(threading.Thread):
    """Enqueues one ``noop`` job per call, about ``rate`` a second, riding out the outage.
    ``acked`` maps each acknowledged id to the wall-clock time its acknowledgement arrived."""

    def __init__(self, url: str, queue: str, rate: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.queue = Queue.from_url(url, queue)
        self.rate = rate
        self.acked: dict[str, float] = {}
        self.refused = 0
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.wait(1 / self.rate):
            try:
                job_id = self.queue.enqueue("noop", {"n": n}).id
            except ConveyorError:
                # Not acknowledged: the producer cannot count it (it may or may not exist).
                self.refused += 1
                continue
            self.acked[job_id] = time.time()
            n += 1
        self.queue.client.close()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_enqueues_acknowledged_before_a_redis_restart_survive_and_workers_reconnect(
    stop_signal: signal.Signals,
    workers: Workers,
    own_redis: RedisServer,
    own_queue: Queue,
    job_ledger: Ledger,
) -> None:
    pool = [workers.start(redis_url=own_redis.url, concurrency=8) for _ in range(2)]
    processes = {w.child(): w for w in pool}
    producer = Producer(own_redis.url, own_queue.keys.queue, rate=300)
    producer.start()
    time.sleep(BEFORE)

    stopped_at = time.time()
    own_redis.stop(stop_signal)
    time.sleep(DOWN)
    own_redis.start()
    restarted = time.monotonic()
    time.sleep(AFTER)
    producer.halt.set()
    producer.join(10)

    # What the producer was told was accepted, against what Redis reloaded.
    acked = producer.acked
    present = {
        job_id
        for job_id, exists in zip(acked, _exists(own_queue, list(acked)), strict=True)
        if exists
    }
    must_survive = {
        job_id
        for job_id, at in acked.items()
        if stop_signal == signal.SIGTERM or at < stopped_at - WINDOW
    }
    in_window = {job_id for job_id, at in acked.items() if stopped_at - WINDOW <= at < stopped_at}
    missing = must_survive - present
    print(
        f"\nRedis {stop_signal.name}: {len(acked)} enqueues acknowledged "
        f"({len(in_window)} in the last {WINDOW:g}s before the stop), "
        f"{producer.refused} refused during the outage, {len(missing)} acknowledged and lost, "
        f"{len(in_window - present)} of the last second lost"
    )
    assert not missing, f"{len(missing)} acknowledged enqueues lost, e.g. {sorted(missing)[:5]}"

    # The same worker processes pick up where they were and run every surviving job.
    wait_until(
        lambda: all(own_queue.get_job(j).state == "done" for j in present),
        30,
        "every surviving job to finish",
    )
    print(f"  all {len(present)} done {time.monotonic() - restarted:.1f}s after the restart")
    for pid, worker in processes.items():
        assert worker.child() == pid, "a worker process was replaced"
        assert worker.logs(event="redis_reconnected", pid=pid), f"{pid} never reconnected"
    ran = {row["job_id"] for row in job_ledger.rows(outcome="ok")}
    assert present <= ran
    assert_conserved(own_queue.client, own_queue.keys.queue, present)


def _exists(queue: Queue, ids: list[str]) -> list[bool]:
    pipe = queue.client.pipeline(transaction=False)
    for job_id in ids:
        pipe.exists(queue.keys.job(job_id))
    return [bool(n) for n in pipe.execute()]
