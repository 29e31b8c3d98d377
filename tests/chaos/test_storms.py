"""Issue 3 §2: mixed jobs through a storm of ``kill -9`` or SIGTERM on random workers.

A producer enqueues mixed ``storm`` jobs (quick, short and long sleeps, fail-once, always-fail,
permanent; all four classes; some groups) at a steady rate while a storm thread strikes a
random ``conveyor worker`` supervisor every 1.5 to 3.5 s and keeps the pool at full size:
half the strikes hit the whole node (supervisor and every worker process), half one worker
process, which its supervisor restarts. After the storm the queue drains, and every accepted
job is checked against the independent ledger, its record, its errors and its events
(``tests.support.storm.audit``), plus INV-1 over the Redis structures.

CI runs ``CONVEYOR_STORM_JOBS`` jobs (default 2,500 at 100 jobs/s, about 25 s of storm). The
long form, 20,000 jobs and about 200 s of storm per test, is one command:

    .venv/bin/pytest -m slow tests/chaos/test_storms.py -s

(``CONVEYOR_STORM_RATE`` changes the rate; ``-s`` prints the figures of each run.)
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from conveyor.queue import Queue
from tests.support.storm import Producer, Storm, audit, storm_specs, wait_drained
from tests.support.workers import Ledger, Workers, assert_conserved

pytest_plugins = ["tests.support.worker_fixtures"]

FORMS = ["ci", pytest.param("long", marks=[pytest.mark.slow, pytest.mark.timeout(3600)])]
POOL = 3
"""Supervisors kept running; each runs ``processes`` worker processes."""
SETTINGS: dict[str, Any] = {"processes": 2, "concurrency": 4}


def _size(form: str) -> tuple[int, float]:
    """(jobs, jobs per second) of one run."""
    rate = float(os.environ.get("CONVEYOR_STORM_RATE", "100"))
    if form == "long":
        return 20_000, rate
    return int(os.environ.get("CONVEYOR_STORM_JOBS", "2500")), rate


@dataclass
class Runner:
    """Runs one storm against the test's queue and workers (``run``)."""

    workers: Workers
    queue: Queue
    redis_url: str
    client: redis.Redis

    def run(
        self,
        form: str,
        signal_kind: str,
        *,
        settings: dict[str, Any],
        long_seconds: tuple[float, float],
    ) -> tuple[Producer, Storm, float]:
        """Produce, storm until production ends, then drain; returns the producer, the storm
        and the wall time."""
        jobs, rate = _size(form)
        rng = random.Random(f"{signal_kind}-{form}")
        specs = storm_specs(jobs, rng, long_seconds)
        for _ in range(POOL):
            self.workers.start(wait=False, **settings)
        began = time.monotonic()
        producer = Producer(self.redis_url, self.queue.keys.queue, specs, rate)
        storm = Storm(
            self.workers,
            self.client,
            self.queue.keys,
            signal_kind=signal_kind,
            interval=(1.5, 3.5),
            size=POOL,
            rng=rng,
            settings=settings,
        )
        producer.start()
        storm.start()
        producer.join(timeout=jobs / rate * 3 + 60)
        storm.halt.set()
        storm.join(timeout=30)
        assert producer.error is None, producer.error
        assert storm.error is None, storm.error
        assert not producer.is_alive()
        assert not storm.is_alive()
        # The storm may have stopped between a strike and its restart.
        while len(storm.pool()) < POOL:
            self.workers.start(wait=False, **settings)
        wait_drained(self.queue, timeout=120 if form == "ci" else 600)
        return producer, storm, time.monotonic() - began


@pytest.fixture
def runner(workers: Workers, tracked: Queue, redis_url: str, redis_client: redis.Redis) -> Runner:
    return Runner(workers, tracked, redis_url, redis_client)


@pytest.mark.parametrize("form", FORMS)
def test_kill_storm_loses_nothing_and_reruns_only_what_the_killed_workers_held(
    form: str, runner: Runner, job_ledger: Ledger
) -> None:
    """Zero lost, and every extra run paid for by a kill.

    The bound, and why it is not the issue's "no more than the number of kills": a run is
    repeated only when its lease is recovered, which happens when the lease expires or when
    the dead process's supervisor releases it (fencing rejects any late report of the old
    run). Live workers renew their leases, so only leases the killed processes held can be
    recovered; the storm reads them from Redis with the victims frozen (SIGSTOP) just before
    each kill. Hence the assertions: every lease recovered as ``worker_lost`` was held at a
    kill by the process it names (a held lease may instead be acknowledged, when an ack was
    still on its way as the leases were read); a job runs again under one attempt number only
    after a hand-back, of which there are none here; and the extra runs (ledger runs that
    neither ended in an outcome Conveyor recorded nor were handed back) number at most the
    leases held at the kills, per job and in total. A process holds up to ``concurrency``
    running jobs plus those finished but not yet acknowledged (the reporter batches acks after
    the slot is freed), so one kill may cost several re-runs: the issue's "<= kills" holds only
    when every killed process held at most one lease, which even concurrency 1 does not
    guarantee (an ack in flight while the next job starts). The run prints both figures.
    """
    producer, storm, wall = runner.run(form, "kill", settings=SETTINGS, long_seconds=(1.0, 2.0))
    client, keys = runner.client, runner.queue.keys

    # INV-1 and INV-2: each accepted job in exactly one place, and that place final.
    taken = assert_conserved(client, keys.queue, producer.accepted)
    finished = taken.states["done"] | taken.states["dead"]
    lost = [job_id for job_id in producer.accepted if job_id not in finished]
    killed = {owner for strike in storm.strikes for _, owner in strike.held}
    result = audit(client, keys, producer.kinds, job_ledger.rows(), killed=killed)
    held = set().union(*(strike.held for strike in storm.strikes))
    held_per_kill = [len(strike.held) for strike in storm.strikes]
    extra = sum(result.extra_runs.values())
    print(
        f"\nkill storm ({form}): {len(producer.accepted)} jobs in {wall:.1f}s, "
        f"{len(storm.strikes)} kills {dict(Counter(s.how for s in storm.strikes))}, "
        f"leases held at the kills {sum(held_per_kill)} (max {max(held_per_kill, default=0)} "
        f"per kill; {len(held - result.lost_leases)} acknowledged as they were read), "
        f"extra runs {extra} (issue's bound: {len(storm.strikes)} kills), "
        f"lost {len(lost)}\n  {result.report()}"
    )

    assert not lost, f"{len(lost)} jobs lost, e.g. {lost[:5]}"
    assert sum(held_per_kill) > 0, "no kill hit a running job: the storm proved nothing"
    assert not result.problems, "\n".join(result.problems[:50])
    assert result.lost_leases <= held, (
        f"recovered as lost but not held at a kill: {sorted(result.lost_leases - held)[:10]}"
    )
    assert extra <= sum(held_per_kill)
    times_held = Counter(job_id for job_id, _ in held)
    over = {j: n for j, n in result.extra_runs.items() if n > times_held[j]}
    assert not over, f"jobs re-run more often than a kill held them: {over}"


@pytest.mark.parametrize("form", FORMS)
def test_sigterm_storm_loses_nothing_and_spends_no_attempt_on_a_drain(
    form: str, runner: Runner, job_ledger: Ledger
) -> None:
    """Drains hand jobs back and cost nothing.

    Grace is 0.5 s and one job in twenty sleeps 1 to 2.5 s, so drains both finish short jobs
    and hand long ones back; one strike in five sends a second SIGTERM, which hands back at
    once. With no kill, no lease may be lost: every attempt a job consumed ended in a handler
    outcome, so a job that never failed is done at attempt 1 however often it was handed back;
    every hand-back is followed by a lease of the same attempt number; no job runs again after
    its handler finished (drains acknowledge before exiting); and every struck process and
    supervisor exits 0 within its grace.
    """
    settings = {**SETTINGS, "grace": 0.5}
    producer, storm, wall = runner.run(form, "term", settings=settings, long_seconds=(1.0, 2.5))
    client, keys = runner.client, runner.queue.keys

    taken = assert_conserved(client, keys.queue, producer.accepted)
    finished = taken.states["done"] | taken.states["dead"]
    lost = [job_id for job_id in producer.accepted if job_id not in finished]
    rows = job_ledger.rows()
    result = audit(client, keys, producer.kinds, rows, killed=set())
    cut_short = sum(1 for r in rows if r["outcome"] == "cancelled")
    print(
        f"\nSIGTERM storm ({form}): {len(producer.accepted)} jobs in {wall:.1f}s, "
        f"{len(storm.strikes)} SIGTERMs {dict(Counter(s.how for s in storm.strikes))}, "
        f"runs cut short by a drain {cut_short}, lost {len(lost)}\n  {result.report()}"
    )

    assert not lost, f"{len(lost)} jobs lost, e.g. {lost[:5]}"
    assert storm.strikes, "the storm never struck"
    assert not result.problems, "\n".join(result.problems[:50])
    assert not result.lost_leases, f"leases lost without a kill: {sorted(result.lost_leases)[:10]}"
    assert result.figures["handbacks"] > 0, "no drain handed a job back: the storm proved nothing"
    assert result.figures["extra runs"] == 0, "a drain made a job run more than it needed"
    # A handler that finished was acknowledged: it never ran a second time.
    ends = Counter(r["job_id"] for r in rows if r["outcome"] in ("ok", "permanent"))
    assert [job_id for job_id, n in ends.items() if n > 1] == []
    for worker in storm.terminated:
        assert worker.wait(30) == 0, f"{worker.name} exited non-zero after SIGTERM"
    for worker in runner.workers.started:
        for event in ("process_killed", "report_abandoned"):
            assert not worker.logs(event=event), worker.logs(event=event)
        # A process struck while still importing dies of the signal, holding nothing: it
        # installs its handler before it logs its start, and claims only after that.
        started = {e["pid"] for e in worker.logs(event="worker_started")}
        for died in worker.logs(event="process_died"):
            pid = int(died["message"].split()[2])
            assert "by SIGTERM" in died["message"], died["message"]
            assert pid not in started, died["message"]
