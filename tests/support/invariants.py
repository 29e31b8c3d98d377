"""INV-1 from the Redis structures themselves: where every job of one queue is right now.

``census`` reads every structure that can hold a job id (group lists, delayed and lease sets,
the dead-letter set, finished records kept by retention) and reports each id's state, plus the
ways the structures can disagree: an id in two states, a structure naming a job whose record
is gone, a record no structure reaches, a record whose own state field says otherwise, a ready
group nobody will ever claim, and counters that differ from what they count.

Typical use: ``census(client, queue.keys).assert_sound()`` after a step, and
``census(...).states["dead"]`` (a set of ids) to compare with what a test expects. The census
is one SCAN plus one pipeline, not one atomic read: it is exact while nothing else writes to
the queue, so call it between steps or after workers have stopped, not during a storm.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import redis

from conveyor.keys import PRIORITY_CLASSES, Keyspace

STATES: tuple[str, ...] = ("ready", "delayed", "leased", "dead", "done")
"""Where a job can be; a job acknowledged with no retention is in none (its record is gone)."""

_RECORD_STATE = {
    "ready": "queued",
    "delayed": "delayed",
    "leased": "active",
    "dead": "dead",
    "done": "done",
}
"""The ``s`` field of a job record in each state."""


@dataclass
class Census:
    states: dict[str, set[str]]
    """State -> ids found in that state's structures."""
    records: dict[str, tuple[str, str]]
    """Id -> (``s`` field, ``c`` field) of every job record in Redis."""
    filed_under: dict[str, set[str]] = field(default_factory=dict)
    """Id -> classes whose ready/delayed/lease structures hold it (a job has exactly one)."""
    stranded: set[tuple[str, str]] = field(default_factory=set)
    """(class, group) with ready jobs, neither in its class's rotation nor paused."""
    repeated: set[str] = field(default_factory=set)
    """Ids queued more than once in the group lists (each copy would run)."""
    counters: dict[str, int] = field(default_factory=dict)
    """The ``counts`` hash as stored."""
    expected_counters: dict[str, int] = field(default_factory=dict)
    """The same counters recomputed from the structures (dead letters by their record's class)."""

    def state_of(self, job_id: str) -> set[str]:
        return {state for state, ids in self.states.items() if job_id in ids}

    @property
    def placed(self) -> set[str]:
        """Every id some structure holds."""
        return set().union(*self.states.values())

    @property
    def in_two_states(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = defaultdict(set)
        for state, ids in self.states.items():
            for job_id in ids:
                seen[job_id].add(state)
        return {job_id: states for job_id, states in seen.items() if len(states) > 1}

    @property
    def missing_records(self) -> set[str]:
        """Ids a structure holds whose job record does not exist."""
        return self.placed - self.records.keys()

    @property
    def unreachable(self) -> set[str]:
        """Job records no structure holds: lost jobs (finished ones are ``done``)."""
        return self.records.keys() - self.placed

    @property
    def misfiled(self) -> dict[str, tuple[str, str]]:
        """Id -> (state by structure, ``s`` field) where the two disagree, or a job sits in
        another class's structures than its own."""
        out: dict[str, tuple[str, str]] = {}
        for state, ids in self.states.items():
            for job_id in ids & self.records.keys():
                recorded, priority = self.records[job_id]
                if recorded != _RECORD_STATE[state]:
                    out[job_id] = (state, recorded)
                elif self.filed_under.get(job_id, {priority}) != {priority}:
                    classes = ",".join(sorted(self.filed_under[job_id]))
                    out[job_id] = (f"{state} under {classes}", f"class {priority}")
        return out

    @property
    def counter_drift(self) -> dict[str, tuple[int, int]]:
        """Counter -> (stored, recomputed) where they differ; absent counts as zero."""
        names = self.counters.keys() | self.expected_counters.keys()
        return {
            name: (self.counters.get(name, 0), self.expected_counters.get(name, 0))
            for name in sorted(names)
            if self.counters.get(name, 0) != self.expected_counters.get(name, 0)
        }

    def problems(self) -> list[str]:
        """Every disagreement found, one readable line each; empty when INV-1 holds."""
        found = []
        for job_id, states in sorted(self.in_two_states.items()):
            found.append(f"{job_id} is in {len(states)} states: {', '.join(sorted(states))}")
        for job_id in sorted(self.repeated):
            found.append(f"{job_id} is queued more than once")
        for job_id in sorted(self.missing_records):
            found.append(f"{job_id} is {'/'.join(sorted(self.state_of(job_id)))} with no record")
        for job_id in sorted(self.unreachable):
            found.append(f"{job_id} has a record ({self.records[job_id][0]}) but no place")
        for job_id, (state, recorded) in sorted(self.misfiled.items()):
            found.append(f"{job_id} is {state} but its record says {recorded}")
        for priority, group in sorted(self.stranded):
            found.append(f"group {group!r} of {priority} has ready jobs but is not in rotation")
        for name, (stored, actual) in self.counter_drift.items():
            found.append(f"counter {name} is {stored}, structures hold {actual}")
        return found

    def assert_sound(self) -> None:
        problems = self.problems()
        assert not problems, "INV-1 violated:\n" + "\n".join(problems)


def census(
    client: redis.Redis, keys: Keyspace, classes: tuple[str, ...] = PRIORITY_CLASSES
) -> Census:
    """Read every job-holding structure of ``keys``'s queue (see the module docstring)."""
    names = _scan(client, keys.base + "*")
    job_prefix = keys.job("")
    record_ids = [name[len(job_prefix) :] for name in names if name.startswith(job_prefix)]
    group_lists = [
        (priority, name[len(keys.group(priority, "")) :], name)
        for priority in classes
        for name in names
        if name.startswith(keys.group(priority, ""))
    ]

    # Everything else in one round trip, so the picture is as close to one instant as it gets.
    pipe = client.pipeline(transaction=False)
    pipe.smembers(keys.paused)
    pipe.hgetall(keys.counts)
    pipe.zrange(keys.dead, 0, -1)
    pipe.hgetall(keys.dead_class)
    for priority in classes:
        pipe.zrange(keys.ready(priority), 0, -1)
        pipe.zrange(keys.delayed(priority), 0, -1)
        pipe.zrange(keys.lease(priority), 0, -1)
    for _, _, name in group_lists:
        pipe.lrange(name, 0, -1)
    for job_id in record_ids:
        pipe.hmget(keys.job(job_id), "s", "c")
    replies = iter(pipe.execute())

    paused = set(_decode(next(replies)))
    # Only the size counters describe structures; ``deferred:`` and ``replayed:`` are totals.
    counters = {
        k.decode(): int(v) for k, v in next(replies).items() if k.startswith((b"ready:", b"dead:"))
    }
    states: dict[str, set[str]] = {state: set() for state in STATES}
    states["dead"].update(_decode(next(replies)))
    dead_class = {k.decode(): v.decode() for k, v in next(replies).items()}
    filed_under: dict[str, set[str]] = defaultdict(set)
    rotation: dict[str, set[str]] = {}
    for priority in classes:
        rotation[priority] = set(_decode(next(replies)))
        for state in ("delayed", "leased"):
            ids = _decode(next(replies))
            states[state].update(ids)
            _file(filed_under, ids, priority)

    expected = {f"ready:{priority}": 0 for priority in classes}
    stranded: set[tuple[str, str]] = set()
    queued: Counter[str] = Counter()
    for priority, group, _ in group_lists:
        ids = _decode(next(replies))
        expected[f"ready:{priority}"] += len(ids)
        queued.update(ids)
        _file(filed_under, ids, priority)
        if ids and group not in rotation[priority] and group not in paused:
            stranded.add((priority, group))
    states["ready"].update(queued)

    records = {
        job_id: (_text(state), _text(priority))
        for job_id, (state, priority) in zip(record_ids, replies, strict=True)
    }
    states["done"].update(job_id for job_id, (s, _) in records.items() if s == "done")
    for priority in classes:
        expected[f"dead:{priority}"] = sum(
            1
            for job_id in states["dead"]
            if dead_class.get(job_id, records.get(job_id, ("", ""))[1]) == priority
        )
    return Census(
        states=states,
        records=records,
        filed_under=dict(filed_under),
        stranded=stranded,
        repeated={job_id for job_id, n in queued.items() if n > 1},
        counters=counters,
        expected_counters=expected,
    )


def snapshot(client: redis.Redis, keys: Keyspace) -> dict[str, Any]:
    """Every key of the queue with its type and full value (not TTLs): equal snapshots mean
    a call changed nothing."""
    names = sorted(_scan(client, keys.base + "*"))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.type(name)
    kinds = [kind.decode() for kind in pipe.execute()]
    for name, kind in zip(names, kinds, strict=True):
        if kind == "string":
            pipe.get(name)
        elif kind == "hash":
            pipe.hgetall(name)
        elif kind == "list":
            pipe.lrange(name, 0, -1)
        elif kind == "set":
            pipe.smembers(name)
        elif kind == "zset":
            pipe.zrange(name, 0, -1, withscores=True)
        elif kind == "stream":
            pipe.xrange(name)
        else:
            pipe.echo(kind)
    return {
        name: (kind, value) for name, kind, value in zip(names, kinds, pipe.execute(), strict=True)
    }


def events(client: redis.Redis, keys: Keyspace) -> list[tuple[str, list[Any]]]:
    """Every event of the queue's stream, in order: (kind, [id, type, class, attempt, detail]).

    Read here without the history reader's code, so that the tests check it rather than
    share its mistakes: a 'queued_run' record [created ms, first seq, count, type, class]
    stands for one 'queued' event per id of the range."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.events))
    out: list[tuple[str, list[Any]]] = []
    for _, fields in entries:
        kind, records = fields[b"e"].decode(), orjson.loads(fields[b"d"])
        if kind != "queued_run":
            out += [(kind, record) for record in records]
            continue
        for created_ms, first, count, job_type, priority in records:
            out += [
                ("queued", [f"{int(created_ms):013d}-{seq:016d}", job_type, priority, 0, ""])
                for seq in range(int(first), int(first) + int(count))
            ]
    return out


def _scan(client: redis.Redis, pattern: str) -> list[str]:
    # The queue's base holds '{' and '}' and may hold glob characters: match it literally.
    literal = "".join("\\" + c if c in "*?[]\\" else c for c in pattern[:-1]) + "*"
    return [name.decode() for name in client.scan_iter(match=literal, count=10_000)]


def _file(filed_under: dict[str, set[str]], ids: list[str], priority: str) -> None:
    for job_id in ids:
        filed_under[job_id].add(priority)


def _decode(raw: list[bytes]) -> list[str]:
    return [item.decode() for item in raw]


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode()
