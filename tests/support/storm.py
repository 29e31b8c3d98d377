"""Machinery of the storm tests (``tests/chaos/test_storms.py``, issue 3 §2).

A paced producer enqueues a mix of the ``storm`` job of ``tests.support.tasks`` (quick, short
sleeps, fail-once, always-fail, permanent; every priority class; some groups) while a storm
thread strikes random ``conveyor worker`` supervisors: ``kill -9`` of a whole node (the
supervisor and every worker process at once) or of one worker process, or SIGTERM to either.
Each kill first freezes its victims (SIGSTOP) and records the leases they hold, read from
Redis, then kills them: that set is what the design allows to run again. ``audit`` then reads
the ledger, the job records and the event stream and returns every disagreement as one line.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from conveyor.job import Backoff, JobInfo, JobSpec
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.queue import Queue
from tests.support.invariants import events
from tests.support.workers import WorkerProcess, Workers, alive, children_of

QUICK = Backoff(base=0.1, cap=1, jitter=False)
"""Retries and crash recoveries come back fast, so a storm's tail stays short."""
ENDED = {"ok": "completed", "error": "error", "permanent": "permanent_error"}
"""Ledger outcome of a run that reached its end -> how Conveyor must have recorded it."""
SHUTDOWN = "conveyor:shutdown"


def pid_of(identity: str) -> int:
    """The pid in a worker process's identity (``<host>:<pid>:<supervisor tag>``, see
    ``WorkerSettings.identity_of``; ``Workers`` sets no worker name)."""
    return int(identity.split(":")[1])


# -- the jobs ------------------------------------------------------------------------------------


def storm_specs(n: int, rng: random.Random, long_seconds: tuple[float, float]) -> list[JobSpec]:
    """``n`` mixed jobs. Ok kinds get 5 attempts so that kills alone rarely exhaust them;
    ``long_seconds`` bounds the few long sleeps (longer than a drain's grace in the SIGTERM
    storm, so drains hand them back)."""
    specs = []
    for i in range(n):
        roll = rng.random()
        payload: dict[str, Any] = {"i": i, "kind": "ok"}
        attempts = 5
        if roll < 0.50:
            pass
        elif roll < 0.75:
            payload["seconds"] = round(rng.uniform(0.02, 0.4), 3)
        elif roll < 0.80:
            payload["seconds"] = round(rng.uniform(*long_seconds), 3)
        elif roll < 0.90:
            payload.update(kind="fail_once", seconds=round(rng.uniform(0, 0.1), 3))
        elif roll < 0.95:
            payload["kind"], attempts = "permanent", 3
        else:
            payload["kind"], attempts = "always_fail", 3
        group = f"tenant-{rng.randrange(8)}" if rng.random() < 0.3 else ""
        specs.append(
            JobSpec(
                "storm",
                payload,
                priority=rng.choice(PRIORITY_CLASSES),
                group=group,
                max_attempts=attempts,
                backoff=QUICK,
            )
        )
    return specs


class Producer(threading.Thread):
    """Enqueues ``specs`` in small batches at ``rate`` jobs/s; ``accepted`` holds the ids
    Redis acknowledged, ``kinds`` each one's kind."""

    def __init__(self, url: str, queue: str, specs: list[JobSpec], rate: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.queue = Queue.from_url(url, queue)
        self.specs = specs
        self.rate = rate
        self.accepted: list[str] = []
        self.kinds: dict[str, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        batch = max(1, round(self.rate / 20))
        began = time.monotonic()
        try:
            for start in range(0, len(self.specs), batch):
                chunk = self.specs[start : start + batch]
                for spec, done in zip(chunk, self.queue.enqueue_many(chunk), strict=True):
                    self.accepted.append(done.id)
                    self.kinds[done.id] = spec.payload["kind"]
                ahead = began + (start + len(chunk)) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test thread
            self.error = exc
        finally:
            self.queue.client.close()


# -- the storm -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strike:
    at: float
    how: str
    """``kill-node``, ``kill-process``, ``term-node``, ``term-process`` (``+hurry``: twice)."""
    pids: tuple[int, ...]
    """The worker processes (not supervisors) it hit."""
    held: frozenset[tuple[str, str]] = frozenset()
    """(job id, identity) leased to the killed processes at the instant they died (frozen
    with SIGSTOP, read, then killed)."""


def leases_held(client: redis.Redis, keys: Keyspace, pids: Iterable[int]) -> set[tuple[str, str]]:
    """(job id, identity) of every active lease whose token names one of ``pids``."""
    wanted = set(pids)
    leased = [
        job_id.decode()
        for c in PRIORITY_CLASSES
        for job_id in cast(list[bytes], client.zrange(keys.lease(c), 0, -1))
    ]
    pipe = client.pipeline(transaction=False)
    for job_id in leased:
        pipe.hmget(keys.job(job_id), "s", "lt")
    held = set()
    for job_id, (state, token) in zip(leased, pipe.execute(), strict=True):
        if state == b"active" and token:
            owner = token.decode().split("/", 1)[0]
            if pid_of(owner) in wanted:
                held.add((job_id, owner))
    return held


class Storm(threading.Thread):
    """Every ``interval`` seconds, strikes one random live supervisor of ``workers`` and keeps
    ``size`` supervisors running. ``signal_kind`` is ``"kill"`` (SIGKILL of the node's or one
    worker process's group) or ``"term"`` (SIGTERM, sometimes twice to hurry the drain)."""

    def __init__(
        self,
        workers: Workers,
        client: redis.Redis,
        keys: Keyspace,
        *,
        signal_kind: str,
        interval: tuple[float, float],
        size: int,
        rng: random.Random,
        settings: dict[str, Any],
    ) -> None:
        super().__init__(name="storm", daemon=True)
        self.workers, self.client, self.keys = workers, client, keys
        self.signal_kind, self.interval, self.size = signal_kind, interval, size
        self.rng, self.settings = rng, settings
        self.strikes: list[Strike] = []
        self.terminated: list[WorkerProcess] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def pool(self) -> list[WorkerProcess]:
        """Supervisors that run and have not been told to stop."""
        gone = {id(w) for w in self.terminated}
        return [w for w in self.workers.started if w.process.poll() is None and id(w) not in gone]

    def run(self) -> None:
        try:
            while not self.halt.wait(self.rng.uniform(*self.interval)):
                live = [w for w in self.pool() if w.children()]
                if live:
                    self._strike(self.rng.choice(live))
                while len(self.pool()) < self.size:
                    self.workers.start(wait=False, **self.settings)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test thread
            self.error = exc

    def _strike(self, worker: WorkerProcess) -> None:
        node = self.rng.random() < 0.5
        at = time.time()
        if self.signal_kind == "kill":
            pids = self._freeze_node(worker) if node else self._freeze_process(worker)
            # Frozen processes send nothing more, and whatever they had already written (a
            # claim, an ack) lands meanwhile: what they hold now is what the kill takes. Read
            # it before the kill, because a surviving supervisor recovers a dead process's
            # leases as soon as it sees it die.
            time.sleep(0.1)
            held = leases_held(self.client, self.keys, pids)
            for pgid in (worker.pid, *pids) if node else pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            if node:
                worker.process.wait(5)
            _wait_dead(pids)
            how = "kill-node" if node else "kill-process"
            self.strikes.append(Strike(at, how, tuple(pids), frozenset(held)))
            return
        hurry = self.rng.random() < 0.2
        target = worker.pid if node else worker.children()[0]
        pids = worker.children() if node else [target]
        os.kill(target, signal.SIGTERM)
        if node:
            self.terminated.append(worker)
        if hurry:
            time.sleep(self.rng.uniform(0.05, 0.5))
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGTERM)
        how = ("term-node" if node else "term-process") + ("+hurry" if hurry else "")
        self.strikes.append(Strike(at, how, tuple(pids)))

    @staticmethod
    def _freeze_node(worker: WorkerProcess) -> list[int]:
        """SIGSTOP the supervisor, then every worker process; returns the worker processes.
        The supervisor goes first so it cannot start one between the scan and the freeze."""
        os.kill(worker.pid, signal.SIGSTOP)
        pids = children_of(worker.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def _freeze_process(worker: WorkerProcess) -> list[int]:
        pid = worker.children()[0]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGSTOP)
        return [pid]


def _wait_dead(pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def wait_drained(queue: Queue, timeout: float) -> float:
    """Wait until no job of the queue is ready, delayed or leased; returns the seconds taken."""
    began = time.monotonic()
    while True:
        stats = queue.stats()
        if not any(s.ready or s.due_delayed or s.future_delayed or s.in_flight for s in stats):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"queue not drained after {timeout}s: {stats}")
        time.sleep(0.2)


# -- the audit -----------------------------------------------------------------------------------


def job_records(client: redis.Redis, keys: Keyspace, ids: list[str]) -> dict[str, JobInfo]:
    out: dict[str, JobInfo] = {}
    for start in range(0, len(ids), 2000):
        chunk = ids[start : start + 2000]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hgetall(keys.job(job_id))
            pipe.lrange(keys.errors(job_id), 0, -1)
        replies = pipe.execute()
        for n, job_id in enumerate(chunk):
            raw, errors = replies[2 * n], replies[2 * n + 1]
            if raw:
                out[job_id] = JobInfo.from_redis(job_id, raw, errors)
    return out


@dataclass
class Audit:
    problems: list[str] = field(default_factory=list)
    figures: Counter[str] = field(default_factory=Counter)
    lost_leases: set[tuple[str, str]] = field(default_factory=set)
    """(job id, identity) of every attempt recovered as ``worker_lost``."""
    extra_runs: Counter[str] = field(default_factory=Counter)
    """Job id -> runs the ledger shows started that neither ended in an outcome Conveyor
    recorded nor were handed back: the runs lost with a lease, paid for again."""

    def report(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.figures.items()))


def audit(
    client: redis.Redis,
    keys: Keyspace,
    kinds: dict[str, str],
    ledger_rows: list[dict[str, Any]],
    *,
    killed: set[str],
) -> Audit:
    """Check every accepted job (``kinds``: id -> kind) against the ledger, its record, its
    errors and its events (INV-2, INV-4, one terminal transition each). ``killed`` holds the
    identities of killed worker processes: only their leases may be recovered as lost."""
    result = Audit()
    records = job_records(client, keys, list(kinds))
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in ledger_rows:
        rows[row["job_id"]].append(row)
    terminal: dict[str, Counter[str]] = defaultdict(Counter)
    leases: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for kind, (job_id, _, _, attempt, _) in events(client, keys):
        if kind in ("completed", "dead_lettered"):
            terminal[job_id][kind] += 1
        elif kind in ("started", "handed_back"):
            leases[job_id].append((kind, attempt))

    for job_id, kind in kinds.items():
        info = records.get(job_id)
        if info is None:
            result.problems.append(f"{job_id} ({kind}) has no record")
            continue
        problems = _audit_job(
            info,
            kind=kind,
            rows=rows[job_id],
            terminal=terminal[job_id],
            killed=killed,
            result=result,
        )
        problems += _audit_handbacks(leases[job_id])
        result.problems += [f"{job_id} ({kind}): {p}" for p in problems]
        result.figures[f"{info.state} ({kind})"] += 1
        handbacks = sum(1 for k, _ in leases[job_id] if k == "handed_back")
        result.figures["handbacks"] += handbacks
        if handbacks and info.state == "done" and not info.errors:
            # The brief's case: handed back N times, never failed, so done at attempt 1.
            result.figures["done at attempt 1 after handbacks"] += info.attempts == 1
    result.figures["runs started"] = sum(1 for r in ledger_rows if r["outcome"] == "started")
    result.figures["extra runs"] = sum(result.extra_runs.values())
    result.figures["leases lost"] = len(result.lost_leases)
    return result


def _audit_job(
    info: JobInfo,
    *,
    kind: str,
    rows: list[dict[str, Any]],
    terminal: Counter[str],
    killed: set[str],
    result: Audit,
) -> list[str]:
    problems = []
    errors = [(int(e["attempt"]), str(e["reason"]), str(e["worker"])) for e in info.errors]
    reasons = [reason for _, reason, _ in errors]

    # INV-2 and one terminal transition: done with one completion, or dead with one dead letter.
    if info.state not in ("done", "dead"):
        problems.append(f"ended {info.state}")
    wanted = "completed" if info.state == "done" else "dead_lettered"
    if terminal != Counter({wanted: 1}):
        problems.append(f"terminal events {dict(terminal)}, wanted one {wanted}")

    # INV-4: attempts count leases; each one ended as a handler outcome or a lost lease.
    consumed = len(errors) + (info.state == "done")
    if info.attempts != consumed:
        problems.append(f"attempts {info.attempts} but {consumed} ended runs ({reasons})")
    if [a for a, _, _ in errors] != list(range(1, len(errors) + 1)):
        problems.append(f"error attempts {[a for a, _, _ in errors]}")
    for attempt, reason, worker in errors:
        if reason == "worker_lost":
            result.lost_leases.add((info.id, worker))
            if worker not in killed:
                problems.append(f"attempt {attempt} lost by {worker}, which nobody killed")
        elif reason not in _designed(kind, attempt):
            problems.append(f"attempt {attempt} failed with {reason}")
    if info.state == "dead":
        if info.dead_reason != (reasons[-1] if reasons else None):
            problems.append(f"dead as {info.dead_reason}, last error {reasons[-1:]}")
        exhausted = info.attempts == info.max_attempts
        if kind == "always_fail" and not exhausted:
            problems.append(f"dead after {info.attempts}/{info.max_attempts} attempts")
        if kind in {"ok", "fail_once"} and not exhausted:
            problems.append(f"dead after {info.attempts}/{info.max_attempts} attempts")
        if kind == "permanent" and not (info.dead_reason == "permanent_error" or exhausted):
            problems.append(f"dead as {info.dead_reason} before its attempts ran out")
    elif kind in ("permanent", "always_fail"):
        problems.append("succeeded")

    # The ledger against Conveyor's records: every attempt Conveyor says a handler ended has a
    # run in the ledger that ended that way; a run under a lost lease is an extra run.
    started = [r["attempt"] for r in rows if r["outcome"] == "started"]
    ended = {(r["attempt"], ENDED[r["outcome"]]) for r in rows if r["outcome"] in ENDED}
    outcomes = {a: r for a, r, _ in errors if r != "worker_lost"}
    if info.state == "done":
        outcomes[info.attempts] = "completed"
    for attempt, outcome in outcomes.items():
        if (attempt, outcome) not in ended:
            problems.append(f"attempt {attempt} recorded {outcome}, no such run in the ledger")
    cancelled = [
        r["attempt"] for r in rows if r["outcome"] == "cancelled" and r["reason"] == SHUTDOWN
    ]
    # Counted from the ledger: runs that neither produced an outcome nor were handed back.
    result.extra_runs[info.id] = len(started) - len(outcomes) - len(cancelled)
    if not set(started) <= set(range(1, info.attempts + 1)):
        problems.append(f"runs at attempts {started}, only {info.attempts} counted")
    # A run is repeated under one attempt number only after a drain handed it back.
    repeats = Counter(started) - Counter(cancelled)
    if any(n > 1 for n in repeats.values()):
        problems.append(f"attempt numbers {started} repeat without a hand-back {cancelled}")
    return problems


def _designed(kind: str, attempt: int) -> set[str]:
    """Failure reasons a run of ``kind`` at ``attempt`` may end with by design."""
    if kind == "fail_once":
        return {"error"} if attempt == 1 else set()
    if kind == "always_fail":
        return {"error"}
    if kind == "permanent":
        return {"permanent_error"}
    return set()


def _audit_handbacks(leases: list[tuple[str, int]]) -> list[str]:
    """A hand-back refunds its attempt: it follows a lease of that attempt, and the job's next
    lease carries the same attempt number again."""
    problems = []
    for n, (kind, attempt) in enumerate(leases):
        if kind != "handed_back":
            continue
        before = leases[n - 1] if n else None
        after = next((a for k, a in leases[n + 1 :] if k == "started"), None)
        if before != ("started", attempt) or after != attempt:
            problems.append(f"handed back at attempt {attempt}: leases {leases}")
    return problems
