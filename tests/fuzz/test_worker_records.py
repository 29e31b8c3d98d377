"""Malformed job records, written straight into Redis, against one real ``conveyor worker``.

A broken producer or a foreign client can leave anything in a job's hash: bytes that are not
JSON, a payload cut short, fields of the wrong kind, non-UTF-8 text, huge values, a missing
type. Each example writes a few such records into the ready structures (exactly where
enqueue.lua would put a job), enqueues well-formed jobs beside them, and waits until all are
settled. The property (cases.md B23, INV-1): every record that cannot run faithfully is
dead-lettered once with a reason that fits it and its raw payload kept; every record that can
run, and every well-formed job, completes; the worker process is the same one throughout; and
the census finds every job in exactly one place.

One worker process serves the whole module: starting one per example would cost a second each
and test nothing more.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import example, given
from hypothesis import strategies as st

from conveyor.config import QueueConfig
from conveyor.errors import JobNotFound
from conveyor.keys import PRIORITY_CLASSES
from conveyor.local import RedisServer
from conveyor.queue import Queue
from tests.fuzz.profiles import fuzz
from tests.support.workers import (
    Ledger,
    WorkerProcess,
    Workers,
    assert_conserved,
    wait_until,
    worker_pool,
)

Record = dict[str, bytes]
"""A job hash as a foreign client writes it: field name -> raw value."""

HANDLED = {"noop"}
"""Job types the worker under test runs (tests.support.tasks) that these records may name."""
POISON_REASONS = {"invalid_job", "unknown_job_type", "decode_error"}
_COUNTER = itertools.count()
_POSITIVE_INT = re.compile(rb"[0-9]{1,15}")


# -- the worker and its queue, shared by every example -----------------------------------------


@pytest.fixture(scope="module")
def fuzz_queue(redis_server: RedisServer) -> Iterator[Queue]:
    client = redis.Redis(port=redis_server.port)
    queue = Queue(client, f"fz{uuid.uuid4().hex[:10]}")
    # Finished records stay for the census; poison jobs must never be retried, so a second
    # attempt would show up as attempts == 2.
    queue.configure(QueueConfig(done_retention=3600))
    yield queue
    client.close()


@pytest.fixture(scope="module")
def fuzz_ledger(redis_server: RedisServer, fuzz_queue: Queue) -> Iterator[Ledger]:
    ledger = Ledger.at(redis_server.url, f"ledger:{fuzz_queue.keys.queue}")
    yield ledger
    ledger.client.delete(ledger.name)
    ledger.close()


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisServer,
    fuzz_queue: Queue,
    fuzz_ledger: Ledger,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    directory: Path = tmp_path_factory.mktemp("fuzz-worker")
    with worker_pool(redis_server.url, fuzz_queue.keys.queue, fuzz_ledger.name, directory) as pool:
        yield _started(pool)


def _started(pool: Workers) -> WorkerProcess:
    process = pool.start()
    process.child()
    return process


# -- what a foreign client may write ------------------------------------------------------------

_text_bytes = st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass"))
"""Text as a foreign client encodes it, lone surrogates included (not valid UTF-8 then)."""
_garbage = st.one_of(
    st.binary(max_size=64),
    _text_bytes,
    st.sampled_from([b"", b"-1", b"0", b"1.5", b"1e400", b"nan", b"inf", b"0x10", b" 7", b"+3"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: str(n).encode()),
)
"""Any value a field may hold: bytes, non-UTF-8, numbers in every spelling."""


class Huge(bytes):
    """A large value that prints as its size, so a failing example stays readable."""

    def __repr__(self) -> str:
        return f"Huge({len(self)} x {self[:1]!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


_huge = st.builds(
    lambda n, byte: Huge(byte * n),
    st.integers(min_value=100_000, max_value=1_200_000),
    st.sampled_from([b"\xff", b"\x00", b"a"]),
)
"""A value of 100 KB to 1.2 MB, for the fields a worker copies into messages and logs."""

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_valid_payloads = st.one_of(
    _json_values.map(orjson.dumps),
    st.integers(min_value=600_000, max_value=1_100_000).map(
        lambda n: Huge(orjson.dumps({"blob": "x" * n}))
    ),
)
"""Payloads that decode: any JSON, including values over the enqueue size limit."""


def _truncated(encoded: bytes) -> bytes:
    cut = encoded[: max(0, len(encoded) - 1)]
    return Huge(cut) if isinstance(encoded, Huge) else cut


_bad_payloads = st.one_of(
    st.binary(max_size=200),
    _valid_payloads.filter(lambda p: len(p) > 1).map(_truncated),
    st.sampled_from(
        [
            b"\xff{not json",
            b'{"a": "\xff\xfe"}',
            '"\ud800"'.encode("utf-8", "surrogatepass"),
            b'"\\ud800"',
            b"[" * 5000 + b"]" * 5000,
            b"NaN",
            b"1e400",
            b"{'single': 'quotes'}",
            b'{"a": 1}trailing',
        ]
    ),
    _huge,
)
"""Payloads a JSON decoder must refuse (most of them; the oracle checks each one)."""


@st.composite
def records(draw: st.DrawFn) -> Record:
    """A job record: a well-formed one with some fields replaced, removed or added."""
    record: Record = {
        "v": b"1",
        "t": b"noop",
        "p": draw(_valid_payloads),
        "c": b"normal",
        "ct": b"1700000000000",
        "s": b"queued",
    }
    for name in draw(st.sets(st.sampled_from(sorted(record)), max_size=3)):
        del record[name]
    mutations = {
        "p": _bad_payloads | _valid_payloads | _garbage,
        "t": _garbage
        | _huge
        | st.sampled_from([b"noop", b"", b"no_such_type", b"noop\x00", b"NOOP"]),
        "v": _garbage | st.sampled_from([b"1", b"2", b"01", b"1.0"]),
        "m": _garbage | st.integers(1, 10).map(lambda n: str(n).encode()),
        "o": _garbage | st.integers(1, 600_000).map(lambda n: str(n).encode()),
    }
    lenient = ("a", "c", "s", "g", "ct", "qt", "bb", "bc", "bj", "dk", "ra", "rc", "lt", "ld")
    for name in draw(st.sets(st.sampled_from(sorted(mutations)), max_size=3)):
        record[name] = draw(mutations[name])
    for name in draw(st.sets(st.sampled_from(lenient), max_size=4)):
        record[name] = draw(_garbage)
    if draw(st.booleans()):
        name = draw(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12))
        record[name] = draw(_garbage)
    return record


def expected_outcomes(record: Record) -> set[str]:
    """What may become of ``record``: {"done"} when it can run as written, else the dead-letter
    reasons that describe what is wrong with it (any one of them is a correct answer)."""
    reasons = set()
    if "t" not in record or "p" not in record or record.get("v") != b"1":
        reasons.add("invalid_job")
    for name in ("m", "o"):
        value = record.get(name)
        if value is not None and not (_POSITIVE_INT.fullmatch(value) and int(value) >= 1):
            reasons.add("invalid_job")
    if "t" in record and record["t"].decode(errors="replace") not in HANDLED:
        reasons.add("unknown_job_type")
    if "p" in record:
        try:
            orjson.loads(bytes(record["p"]))
        except orjson.JSONDecodeError:
            reasons.add("decode_error")
    return reasons or {"done"}


# -- writing them where a job would be ----------------------------------------------------------


def write_ready(queue: Queue, jobs: dict[str, tuple[str, str, Record]]) -> None:
    """Put records straight into their class's group lists, as enqueue.lua would, bypassing
    every validation; ``jobs`` maps id -> (class, group, record)."""
    keys = queue.keys
    pipe = queue.client.pipeline(transaction=True)
    for job_id, (priority, group, record) in jobs.items():
        if record:
            pipe.hset(keys.job(job_id), mapping=dict(record))
        else:
            # A hash cannot be empty: an unrelated field keeps the record in existence.
            pipe.hset(keys.job(job_id), "x-foreign", b"")
        pipe.rpush(keys.group(priority, group), job_id)
        pipe.hincrby(keys.counts, f"ready:{priority}", 1)
        pipe.zadd(keys.ready(priority), {group: 0}, nx=True)
        pipe.rpush(keys.wake(priority), "1")
    pipe.execute()


def reset(queue: Queue, ledger: Ledger) -> None:
    """Empty the queue between examples, so each one is judged (and shrunk) on its own jobs.
    Safe while the worker is idle: it keeps no state about the queue beyond running jobs."""
    names = list(
        queue.client.scan_iter(
            match=queue.keys.base.replace("{", "\\{").replace("}", "\\}") + "*", count=10_000
        )
    )
    if names:
        queue.client.delete(*names)
    queue.configure(QueueConfig(done_retention=3600))
    ledger.client.delete(ledger.name)


def _settled(queue: Queue, ids: list[str]) -> dict[str, Any] | None:
    states = {}
    for job_id in ids:
        try:
            info = queue.get_job(job_id)
        except JobNotFound:
            return None
        if info.state not in ("dead", "done"):
            return None
        states[job_id] = info
    return states


placements = st.tuples(st.sampled_from(PRIORITY_CLASSES), st.sampled_from(["", "acme", "{x}:y"]))


# Half the profile: each example waits for a real worker to settle its jobs.
@fuzz(scale=0.5)
@given(
    bad=st.lists(st.tuples(records(), placements), min_size=1, max_size=4), good=st.integers(1, 3)
)
@example(  # B23's four records: undecodable, no type, unknown type, wrong schema version
    bad=[
        ({"v": b"1", "t": b"noop", "p": b"\xff{not json"}, ("normal", "")),
        ({"v": b"1", "p": b"{}"}, ("normal", "")),
        ({"v": b"1", "t": b"no_such_type", "p": b"{}"}, ("normal", "")),
        ({"v": b"99", "t": b"noop", "p": b"{}"}, ("normal", "")),
    ],
    good=3,
)
def test_a_malformed_record_is_dead_lettered_with_a_reason_and_the_worker_runs_on(
    worker: WorkerProcess,
    fuzz_queue: Queue,
    fuzz_ledger: Ledger,
    bad: list[tuple[Record, tuple[str, str]]],
    good: int,
) -> None:
    reset(fuzz_queue, fuzz_ledger)
    process = worker.child()
    batch = next(_COUNTER)
    jobs = {f"bad{batch}-{i}": (c, g, record) for i, (record, (c, g)) in enumerate(bad)}
    write_ready(fuzz_queue, jobs)
    well_formed = [
        r.id for r in fuzz_queue.enqueue_batch("noop", ({"batch": batch} for _ in range(good)))
    ]

    settled = wait_until(
        lambda: _settled(fuzz_queue, [*jobs, *well_formed]), 10, "every job to settle"
    )

    for job_id, (_, _, record) in jobs.items():
        info = settled[job_id]
        allowed = expected_outcomes(record)
        outcome = "done" if info.state == "done" else info.dead_reason
        assert outcome in allowed, f"{job_id} {record!r:.300}: {outcome}, expected {allowed}"
        if info.state == "dead":
            assert info.errors, "a dead letter without the error that killed it"
            assert info.errors[-1]["reason"] == info.dead_reason
            assert info.errors[-1]["error"], "a dead letter whose error says nothing"
            assert info.payload == record.get("p", b""), "the raw payload was not kept"
            assert len(info.errors) == 1, "a poison job was run more than once"
    for job_id in well_formed:
        assert settled[job_id].state == "done"
    ran = {row["job_id"] for row in fuzz_ledger.rows()}
    should_run = {j for j, (_, _, r) in jobs.items() if expected_outcomes(r) == {"done"}}
    assert should_run | set(well_formed) <= ran

    assert worker.child() == process, "the worker process was replaced"
    assert not worker.logs(event="claimer_crashed")
    assert not worker.logs(event="report_error")
    assert not worker.logs(event="report_retry")
    assert_conserved(fuzz_queue.client, fuzz_queue.keys.queue, [*jobs, *well_formed])
