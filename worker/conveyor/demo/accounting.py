"""Counting every job the demo enqueued into exactly one final state, from three sources.

The producer's record says which jobs Conveyor accepted (and which enqueues it deduplicated);
the handlers' ledger says which ran to completion; Conveyor's job records (kept for the run by
a retention setting) say which were dead-lettered and which are still pending. A job accepted
but neither completed in the ledger nor dead-lettered is lost. The services (mail inbox,
webhook endpoint, files on disk) are checked against the same numbers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from conveyor.demo.ledger import Entry
from conveyor.job import JobSpec
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.queue import Enqueued

CHUNK = 1000
PENDING_STATES = ("queued", "delayed", "active")


@dataclass
class Produced:
    """What the producer sent and what Conveyor answered."""

    accepted: dict[str, JobSpec] = field(default_factory=dict)
    duplicates: Counter[str] = field(default_factory=Counter)
    """Enqueues answered with an earlier job's id, per job type."""

    def add(self, specs: list[JobSpec], results: list[Enqueued]) -> None:
        for spec, result in zip(specs, results, strict=True):
            if result.created:
                self.accepted[result.id] = spec
            else:
                self.duplicates[spec.type] += 1

    def per_class(self) -> Counter[str]:
        return Counter(spec.priority for spec in self.accepted.values())


@dataclass(frozen=True)
class JobRecord:
    """A job's record in Redis at the end (state ``missing`` when there is none)."""

    state: str
    attempts: int
    dead_reason: str
    errors: list[dict[str, Any]]


def job_records(client: redis.Redis, keys: Keyspace, ids: Iterable[str]) -> dict[str, JobRecord]:
    out: dict[str, JobRecord] = {}
    id_list = list(ids)
    for start in range(0, len(id_list), CHUNK):
        chunk = id_list[start : start + CHUNK]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job(job_id), "s", "a", "dr")
            pipe.lrange(keys.errors(job_id), 0, -1)
        replies = pipe.execute()
        for i, job_id in enumerate(chunk):
            state, attempts, reason = replies[2 * i]
            out[job_id] = JobRecord(
                state.decode() if state else "missing",
                int(attempts or 0),
                reason.decode() if reason else "",
                [orjson.loads(e) for e in replies[2 * i + 1]],
            )
    return out


@dataclass(frozen=True)
class Spread:
    """Queue waits of one set of attempts, in seconds."""

    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        ordered = sorted(values)
        if not ordered:
            return cls(0, 0.0, 0.0, 0.0)

        def rank(q: float) -> float:
            return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

        return cls(len(ordered), rank(0.5), rank(0.99), ordered[-1])


@dataclass(frozen=True)
class TypeTotals:
    job_type: str
    priority: str
    accepted: int
    duplicates: int
    completed: int
    dead: int
    pending: int
    lost: int
    retries: int


@dataclass
class Tally:
    """The final state of every accepted job."""

    types: list[TypeTotals]
    completed_ids: set[str]
    dead_ids: set[str]
    dead_reasons: Counter[tuple[str, str]]
    """Dead letters per (job type, reason)."""
    failed_attempts: Counter[str]
    """Failed attempts per reason, whether retried or not."""
    states: Counter[str]
    """Conveyor's state of each accepted job."""
    lost_ids: list[str]
    discrepancies: list[str]

    @property
    def lost(self) -> int:
        return len(self.lost_ids)

    @property
    def retries(self) -> int:
        return sum(t.retries for t in self.types)


def tally(produced: Produced, records: dict[str, JobRecord], entries: list[Entry]) -> Tally:
    ok = {e.job_id for e in entries if e.ok}
    dead = {i for i, r in records.items() if r.state == "dead"}
    pending = {i for i, r in records.items() if r.state in PENDING_STATES}
    by_type: dict[str, list[str]] = defaultdict(list)
    for job_id, spec in produced.accepted.items():
        by_type[spec.type].append(job_id)
    types = []
    for job_type, ids in sorted(by_type.items(), key=lambda kv: _class_rank(produced, kv[1])):
        done = [i for i in ids if i in ok and i not in dead]
        n_dead = sum(i in dead for i in ids)
        failed = sum(len(records[i].errors) for i in ids)
        types.append(
            TypeTotals(
                job_type=job_type,
                priority=produced.accepted[ids[0]].priority,
                accepted=len(ids),
                duplicates=produced.duplicates[job_type],
                completed=len(done),
                dead=n_dead,
                pending=sum(i in pending for i in ids),
                lost=len(ids) - len(done) - n_dead,
                retries=failed - n_dead,
            )
        )
    lost_ids = [i for i in produced.accepted if i not in ok and i not in dead]
    return Tally(
        types=types,
        completed_ids=ok - dead,
        dead_ids=dead,
        dead_reasons=Counter((produced.accepted[i].type, records[i].dead_reason) for i in dead),
        failed_attempts=Counter(e["reason"] for r in records.values() for e in r.errors),
        states=Counter(r.state for r in records.values()),
        lost_ids=lost_ids,
        discrepancies=list(_discrepancies(records, ok, dead)),
    )


def _class_rank(produced: Produced, ids: list[str]) -> int:
    return PRIORITY_CLASSES.index(produced.accepted[ids[0]].priority)


def _discrepancies(records: dict[str, JobRecord], ok: set[str], dead: set[str]) -> Iterator[str]:
    missing = [i for i, r in records.items() if r.state == "missing"]
    if missing:
        yield f"{len(missing)} accepted jobs have no record left in Redis"
    ran_then_dead = ok & dead
    if ran_then_dead:
        yield f"{len(ran_then_dead)} dead letters also completed once, in a run whose ack was lost"


def spread_by(
    entries: Iterable[Entry], key: Callable[[Entry], str], value: Callable[[Entry], float]
) -> dict[str, Spread]:
    """Spread of ``value`` (a queue wait or a run time) over attempts grouped by ``key``."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for e in entries:
        grouped[key(e)].append(value(e))
    return {k: Spread.of(v) for k, v in grouped.items()}


def busiest_rate(entries: Iterable[Entry], window: float = 5.0) -> float | None:
    """Most attempts started per second in any ``window`` seconds: what a rate limit caps."""
    starts = sorted(e.started_at for e in entries)
    if len(starts) < 2:
        return None
    most, low = 0, 0
    for high, at in enumerate(starts):
        while starts[low] <= at - window:
            low += 1
        most = max(most, high - low + 1)
    return most / window
