"""B01: a worker stopped, or cut off, at the instant a job arrives must not lose that job."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from conveyor.queue import Queue
from tests.support.proxy import TcpProxy
from tests.support.workers import (
    DEFAULTS,
    Ledger,
    WorkerProcess,
    Workers,
    assert_conserved,
    kill_redis_clients,
    redis_clients_of,
    wait_until,
)

pytest_plugins = ["tests.support.worker_fixtures"]

GRACE = float(DEFAULTS["grace"])
LONG = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _blocked_in_fetch(client: redis.Redis, worker: WorkerProcess, *, proxied: bool = False) -> None:
    pid = worker.child()

    def blocked() -> bool:
        # Behind the proxy, Redis sees the proxy's connections: the worker is the only blocker.
        clients = client.client_list() if proxied else redis_clients_of(client, pid)
        return any("b" in c["flags"] and c["cmd"] == "blpop" for c in clients)

    wait_until(blocked, 5, "the worker to block waiting for work")


def _around_enqueue(offset: float, act: Callable[[], object], enqueue: Callable[[], str]) -> str:
    """Run ``act`` ``offset`` seconds after (or, negative, before) the enqueue."""
    if offset < 0:
        act()
        time.sleep(-offset)
        return enqueue()
    job_id = enqueue()
    time.sleep(offset)
    act()
    return job_id


@pytest.mark.parametrize("iterations", [30, pytest.param(300, marks=LONG)])
def test_sigterm_racing_an_enqueue_neither_loses_nor_repeats_the_job(
    iterations: int,
    workers: Workers,
    tracked: Queue,
    job_ledger: Ledger,
    redis_client: redis.Redis,
) -> None:
    rng = random.Random(1)
    accepted: list[str] = []
    run_by_stopping_worker = 0
    for i in range(iterations):
        worker = workers.start()
        _blocked_in_fetch(redis_client, worker)

        job_id = _around_enqueue(
            rng.uniform(-0.02, 0.02),
            lambda w=worker: w.signal(signal.SIGTERM),  # type: ignore[misc]
            lambda i=i: tracked.enqueue("noop", {"i": i}).id,  # type: ignore[misc]
        )
        accepted.append(job_id)

        assert worker.wait(GRACE + 5) == 0
        assert_conserved(redis_client, tracked.keys.queue, accepted)
        run_by_stopping_worker += tracked.get_job(job_id).state == "done"

    workers.start()
    wait_until(
        lambda: all(tracked.get_job(j).state == "done" for j in accepted), 10, "every job done"
    )
    print(f"B01 SIGTERM: {run_by_stopping_worker}/{iterations} run by the stopping worker")

    runs = Counter(r["job_id"] for r in job_ledger.rows())
    assert {job_id: runs[job_id] for job_id in accepted} == dict.fromkeys(accepted, 1)
    # A stop is no failure: no attempt was spent on a lost lease (INV-4).
    assert {tracked.get_job(j).attempts for j in accepted} == {1}
    assert_conserved(redis_client, tracked.keys.queue, accepted)


@pytest.mark.parametrize("iterations", [30, pytest.param(300, marks=LONG)])
def test_killing_the_fetch_connection_at_an_enqueue_delays_the_job_but_never_loses_it(
    iterations: int,
    workers: Workers,
    tracked: Queue,
    job_ledger: Ledger,
    redis_client: redis.Redis,
) -> None:
    # A failed wake-up wait pauses the claimer for up to the sweep interval: keep it short.
    worker = workers.start(sweep_interval=0.2)
    pid = worker.child()
    rng = random.Random(2)
    accepted: list[str] = []
    waits = []
    for i in range(iterations):
        _blocked_in_fetch(redis_client, worker)
        before = time.monotonic()

        job_id = _around_enqueue(
            rng.uniform(-0.02, 0.02),
            lambda: kill_redis_clients(redis_client, pid),
            lambda i=i: tracked.enqueue("noop", {"i": i}).id,  # type: ignore[misc]
        )
        accepted.append(job_id)

        # A claim whose reply was cut off leaves the job leased until the lease expires.
        wait_until(lambda j=job_id: tracked.get_job(j).state == "done", 10, f"{job_id} done")  # type: ignore[misc]
        waits.append(time.monotonic() - before)
        assert_conserved(redis_client, tracked.keys.queue, accepted)

    assert worker.child() == pid, "the worker process was replaced"
    runs = Counter(r["job_id"] for r in job_ledger.rows())
    assert all(1 <= runs[j] <= 2 for j in accepted), runs
    waits.sort()
    print(
        f"B01 CLIENT KILL: job done after median {waits[len(waits) // 2]:.2f}s, "
        f"max {waits[-1]:.2f}s; {sum(n == 2 for n in runs.values())} jobs ran twice"
    )


def test_sigterm_while_a_claim_is_in_flight_neither_loses_the_job_nor_spends_an_attempt(
    workers: Workers,
    tracked: Queue,
    job_ledger: Ledger,
    redis_client: redis.Redis,
) -> None:
    """Redis has leased the job to the worker (its wait ended and the claim queued behind it
    ran) but the reply has not reached the worker when SIGTERM arrives.

    The worker talks through a proxy that holds every reply for 0.5 s; the test checks in
    Redis that the job is leased before it sends SIGTERM, so the race is real every time.
    """
    proxy = TcpProxy(redis_client.connection_pool.connection_kwargs["port"]).start()
    accepted = []
    try:
        for i in range(3):
            proxy.response_delay = 0
            worker = workers.start(redis_url=proxy.url)
            _blocked_in_fetch(redis_client, worker, proxied=True)
            proxy.response_delay = 0.5
            job_id = tracked.enqueue("noop", {"i": i}).id
            accepted.append(job_id)
            wait_until(
                lambda j=job_id: redis_client.hget(tracked.keys.job(j), "s") == b"active",  # type: ignore[misc]
                0.4,
                "the claim to lease the job",
            )
            worker.signal(signal.SIGTERM)

            assert worker.wait(GRACE + 5) == 0
            assert redis_client.hget(tracked.keys.job(job_id), "s") == b"queued"
            assert_conserved(redis_client, tracked.keys.queue, accepted)
    finally:
        proxy.stop()

    started = time.monotonic()
    workers.start()
    wait_until(
        lambda: all(tracked.get_job(j).state == "done" for j in accepted), 10, "every job done"
    )
    print(f"B01 claim in flight: jobs done {time.monotonic() - started:.2f}s after restart")
    runs = Counter(r["job_id"] for r in job_ledger.rows())
    assert {j: runs[j] for j in accepted} == dict.fromkeys(accepted, 1)
    assert {tracked.get_job(j).attempts for j in accepted} == {1}, [
        tracked.get_job(j).errors for j in accepted
    ]
