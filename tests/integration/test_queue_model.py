"""A model of the queue checked against the real scripts, step by random step (Hypothesis).

The model knows, for every accepted job, whether it waits (claimable now or only in an hour),
is leased, dead or finished, and its attempt count. After every step the Redis structures must
hold exactly the model's jobs, each once (INV-1), with counters that match; no job completes
twice; a report with a stale token changes nothing (INV-3); attempts follow INV-4.

Time is kept out of the model's guesses so that every run of a failing example fails the same
way: a live worker's lease lasts a minute (longer than any run), and a crashed worker's lease
is granted for one millisecond, so it has surely expired once recover has slept two.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conveyor.job import Backoff, JobSpec
from conveyor.keys import PRIORITY_CLASSES
from conveyor.leases import Claimed
from conveyor.queue import Queue
from tests.support.invariants import census, events, snapshot
from tests.support.scripted import ScriptedWorker

MODEL_DB = 2
LIVE_LEASE_MS = 60_000
CRASHED_LEASE_MS = 1
LATER = 3600.0
"""Seconds of a delay or backoff the test never reaches."""


@dataclass(frozen=True)
class Draft:
    """What the model enqueues; retry_now means backoff 0 (else a retry waits an hour)."""

    priority: str
    group: str
    max_attempts: int
    retry_now: bool
    later: bool
    dedup_key: str

    def spec(self, n: int) -> JobSpec:
        return JobSpec(
            "t",
            {"n": n},
            priority=self.priority,
            group=self.group,
            max_attempts=self.max_attempts,
            delay=LATER if self.later else 0,
            dedup_key=self.dedup_key,
            backoff=Backoff(0 if self.retry_now else LATER, LATER, jitter=False),
        )


# Two classes and two groups: few enough that jobs queue up behind each other in one group,
# which is where rotation, hand-back to the front and retries to the back get exercised.
drafts = st.builds(
    Draft,
    priority=st.sampled_from(("high", "low")),
    group=st.sampled_from(("", "a")),
    max_attempts=st.integers(1, 3),
    retry_now=st.booleans(),
    later=st.booleans(),
    dedup_key=st.sampled_from(("", "", "k1", "k2")),
)


@dataclass
class ModelJob:
    draft: Draft
    state: str = "waiting"
    """waiting, leased, dead, done or purged."""
    claimable: bool = True
    attempts: int = 0


ACTIONS = (
    *["enqueue"] * 2,
    *["claim"] * 3,
    "claim, then crash",
    *["ack"] * 2,
    "fail",
    "fail permanently",
    "hand back",
    "extend",
    "recover",
    "report with a stale token",
    "replay",
    "purge",
    "replay or purge a job that is not dead",
    "pause",
    "resume",
)
"""What one step does; repeats weight the choice. One rule that dispatches, rather than a rule
per action, because Hypothesis switches whole rules off in some runs ("swarm testing"), and the
paths worth exploring need many different actions in one run."""


class QueueMachine(RuleBasedStateMachine):
    url = ""
    """The Redis of the test; set by a subclass, since Hypothesis builds machines itself."""

    def __init__(self) -> None:
        super().__init__()
        self.client = redis.Redis.from_url(self.url)
        self.queue = Queue(self.client, f"m{uuid.uuid4().hex[:10]}")
        self.worker = ScriptedWorker(self.url, self.queue.keys, lease_ttl_ms=LIVE_LEASE_MS)
        self.worker.__enter__()
        self.jobs: dict[str, ModelJob] = {}
        self.dedup: dict[str, str] = {}
        self.held: dict[str, Claimed] = {}
        """Leases of live workers, which will report on them."""
        self.crashed: dict[str, Claimed] = {}
        """Leases of workers that died; they expire at once and wait for recover."""
        self.stale: list[Claimed] = []
        self.paused: set[str] = set()

    def _in(self, *states: str) -> set[str]:
        return {job_id for job_id, job in self.jobs.items() if job.state in states}

    @initialize(batch=st.lists(drafts, min_size=3, max_size=10))
    def start_with_some_jobs(self, batch: list[Draft]) -> None:
        self._enqueue(batch)

    @rule(action=st.sampled_from(ACTIONS), data=st.data())
    def step(self, action: str, data: st.DataObject) -> None:
        if action == "enqueue":
            self._enqueue(data.draw(st.lists(drafts, min_size=1, max_size=4), label="batch"))
        elif action.startswith("claim"):
            n = data.draw(st.integers(1, 4), label="n")
            if action == "claim":
                self.held.update(self._claim(n, LIVE_LEASE_MS))
            else:
                self.crashed.update(self._claim(n, CRASHED_LEASE_MS))
        elif action in ("ack", "fail", "fail permanently", "hand back", "extend"):
            if self.held:
                self._report(action, self.held[_pick(data, self.held)])
        elif action == "recover":
            self._recover()
        elif action == "report with a stale token":
            # Most telling when the job runs again under a new lease: the old token must not
            # settle the new run.
            leased = [old for old in self.stale if self.jobs[old.id].state == "leased"]
            rerun: bool = data.draw(st.booleans(), label="rerun")
            pool = leased if leased and rerun else self.stale
            if pool:
                self._report_stale(data.draw(st.sampled_from(pool), label="old lease"))
        elif action in ("replay", "purge"):
            if self._in("dead"):
                self._admin(action, _pick(data, self._in("dead")))
        elif action == "replay or purge a job that is not dead":
            if self.jobs.keys() - self._in("dead"):
                how = data.draw(st.sampled_from(("replay", "purge")))
                self._admin(how, _pick(data, self.jobs.keys() - self._in("dead")))
        else:
            self._pause(action, data.draw(st.sampled_from(("", "a")), label="group"))

    # -- producing -----------------------------------------------------------------------------

    def _enqueue(self, batch: list[Draft]) -> None:
        specs = [draft.spec(len(self.jobs) + i) for i, draft in enumerate(batch)]
        if len(specs) == 1:
            results = [self.queue.enqueue(specs[0].type, specs[0].payload, **_options(batch[0]))]
        else:
            results = self.queue.enqueue_many(specs)
        for draft, result in zip(batch, results, strict=True):
            if draft.dedup_key in self.dedup:
                assert (result.id, result.created) == (self.dedup[draft.dedup_key], False)
                continue
            assert result.created
            assert result.id not in self.jobs
            if draft.dedup_key:
                self.dedup[draft.dedup_key] = result.id
            self.jobs[result.id] = ModelJob(draft, claimable=not draft.later)

    # -- the lease protocol --------------------------------------------------------------------

    def _claim(self, n: int, lease_ms: int) -> dict[str, Claimed]:
        expected = {
            job_id: job
            for job_id, job in self.jobs.items()
            if job.state == "waiting" and job.claimable and job.draft.group not in self.paused
        }
        result = self.worker.claim(n, lease_ttl_ms=lease_ms)
        assert len(result.jobs) == min(n, len(expected))
        for claimed in result.jobs:
            assert claimed.id in expected, f"claimed {claimed.id}, not claimable in the model"
            job = self.jobs[claimed.id]
            job.attempts += 1
            job.state = "leased"
            assert (claimed.priority, claimed.group) == (job.draft.priority, job.draft.group)
            assert (claimed.attempt, claimed.max_attempts) == (job.attempts, job.draft.max_attempts)
        # Strict priority: nothing left behind outranks what was handed out.
        if result.jobs:
            lowest = max(PRIORITY_CLASSES.index(c.priority) for c in result.jobs)
            taken = {c.id for c in result.jobs}
            left = [job for job_id, job in expected.items() if job_id not in taken]
            assert all(PRIORITY_CLASSES.index(job.draft.priority) >= lowest for job in left)
        return {claimed.id: claimed for claimed in result.jobs}

    def _report(self, how: str, lease: Claimed) -> None:
        """A live worker reports on one of its runs."""
        job = self.jobs[lease.id]
        if how == "extend":
            assert self.worker.extend(lease) == []
            return
        del self.held[lease.id]
        self.stale.append(lease)
        if how == "ack":
            assert self.worker.ack(lease) == []
            job.state = "done"
        elif how == "hand back":
            assert self.worker.hand_back(lease) == []
            job.attempts -= 1
            job.state, job.claimable = "waiting", True
        else:
            permanent = how == "fail permanently"
            [(_, outcome, delay)] = self.worker.fail(lease, permanent=permanent)
            assert (outcome, delay) == self._failed(lease.id, permanent)

    def _failed(self, job_id: str, permanent: bool) -> tuple[str, int]:
        """Apply a failed attempt to the model; returns the outcome and delay to expect."""
        job = self.jobs[job_id]
        if permanent or job.attempts >= job.draft.max_attempts:
            job.state = "dead"
            return "dead", 0
        job.state, job.claimable = "waiting", job.draft.retry_now
        return "retry", 0 if job.draft.retry_now else round(LATER * 1000)

    def _recover(self) -> None:
        if self.crashed:
            time.sleep(2 * CRASHED_LEASE_MS / 1000)
        recovered, _ = self.worker.recover()
        assert recovered == len(self.crashed)
        for job_id, lease in self.crashed.items():
            self._failed(job_id, permanent=False)
            self.stale.append(lease)
        self.crashed.clear()

    def _report_stale(self, old: Claimed) -> None:
        """Every kind of report with a token that is no longer the job's lease."""
        before = snapshot(self.client, self.queue.keys)
        assert self.worker.ack(old) == [old.id]
        assert self.worker.fail(old) == [(old.id, "stale", 0)]
        assert self.worker.fail(old, permanent=True) == [(old.id, "stale", 0)]
        assert self.worker.extend(old) == [old.id]
        assert self.worker.hand_back(old) == [old.id]
        assert snapshot(self.client, self.queue.keys) == before

    # -- admin ---------------------------------------------------------------------------------

    def _admin(self, how: str, job_id: str) -> None:
        """Replay or purge a job: a dead letter changes state, any other job must not."""
        job = self.jobs[job_id]
        before = snapshot(self.client, self.queue.keys)
        if how == "replay":
            report = self.queue.replay([job_id])
            if job.state == "dead":
                assert (report.replayed, report.missing, report.skipped) == (1, [], 0)
                job.state, job.claimable, job.attempts = "waiting", True, 0
                return
            assert (report.replayed, report.skipped) == (0, 1)
        elif job.state == "dead":
            assert self.queue.purge([job_id]) == 1
            job.state = "purged"
            return
        else:
            assert self.queue.purge([job_id]) == 0
        assert snapshot(self.client, self.queue.keys) == before

    def _pause(self, how: str, group: str) -> None:
        if how == "pause":
            self.queue.pause_group(group)
            self.paused.add(group)
        else:
            assert self.queue.resume_group(group) is (group in self.paused)
            self.paused.discard(group)

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def redis_holds_exactly_the_models_jobs(self) -> None:
        found = census(self.client, self.queue.keys)
        found.assert_sound()
        assert found.states["ready"] | found.states["delayed"] == self._in("waiting")
        assert (
            found.states["leased"] == self._in("leased") == self.held.keys() | self.crashed.keys()
        )
        assert found.states["dead"] == self._in("dead")
        assert found.states["done"] == set()
        assert found.records.keys() == self._in("waiting", "leased", "dead")
        later = {job_id for job_id in self._in("waiting") if not self.jobs[job_id].claimable}
        assert later <= found.states["delayed"]

    def teardown(self) -> None:
        try:
            stream = events(self.client, self.queue.keys)
            completions = [event[0] for kind, event in stream if kind == "completed"]
            assert sorted(completions) == sorted(self._in("done")), "a job completed twice"
            names = list(self.client.scan_iter(match=self.queue.keys.base + "*"))
            if names:
                self.client.delete(*names)
        finally:
            self.client.close()
            self.worker.__exit__(None, None, None)


def _pick(data: st.DataObject, ids: Iterable[str]) -> str:
    return data.draw(st.sampled_from(sorted(ids)), label="job")


def _options(draft: Draft) -> dict[str, object]:
    spec = draft.spec(0)
    return {
        "priority": spec.priority,
        "group": spec.group,
        "max_attempts": spec.max_attempts,
        "delay": spec.delay,
        "dedup_key": spec.dedup_key,
        "backoff": spec.backoff,
    }


# Shrinking a failure may take Hypothesis up to five minutes: let it finish and report.
@pytest.mark.timeout(900)
def test_the_queue_behaves_like_its_model(redis_url: str) -> None:
    class Machine(QueueMachine):
        # A database of its own: every census scans the keyspace, which other tests fill.
        url = redis_url.rsplit("/", 1)[0] + f"/{MODEL_DB}"

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=50,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
