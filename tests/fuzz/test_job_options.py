"""Job options of every kind through ``JobSpec``, ``Queue.enqueue``, ``enqueue_many`` and
``enqueue_batch``, against a real Redis.

The property: a producer either gets ``InvalidJob`` (``PayloadTooLarge`` included) and Redis is
exactly as it was, or the job is stored whole, with the options it was given, and a claim hands
back its payload byte for byte. Never a Lua error, never another exception type, never a job
stored in part or filed where it cannot run.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from hypothesis import example, given
from hypothesis import strategies as st

from conveyor import scripts
from conveyor.errors import InvalidJob
from conveyor.job import DEFAULT_MAX_PAYLOAD, Backoff, JobSpec
from conveyor.keys import PRIORITY_CLASSES
from conveyor.local import RedisServer
from conveyor.queue import Queue
from tests.fuzz.profiles import fuzz
from tests.support.invariants import census, snapshot


@pytest.fixture(scope="module")
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture(scope="module")
def budget_queue(client: redis.Redis) -> Iterator[Queue]:
    """A queue per module whose keys are emptied before every example."""
    queue = Queue(client, f"fo{uuid.uuid4().hex[:10]}")
    yield queue
    _empty(queue)


def _empty(queue: Queue) -> None:
    pattern = queue.keys.base.replace("{", "\\{").replace("}", "\\}") + "*"
    names = list(queue.client.scan_iter(match=pattern, count=10_000))
    if names:
        queue.client.delete(*names)


# -- options of every kind ---------------------------------------------------------------------

_anything = st.one_of(
    st.none(), st.booleans(), st.binary(max_size=8), st.lists(st.integers(), max_size=2)
)
_texts = st.one_of(
    st.text(max_size=30),
    st.text(min_size=190, max_size=210),
    st.sampled_from(["a\nb", "x\0", "\ud800", "caf\u00e9", "{tag}", "*", "a:b", " "]),
)
_numbers = st.one_of(
    st.floats(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 0.0004, 0.001, 0.0015, 1e12, 1e300, 10**400, -0.0]),
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=4)
    ),
    max_leaves=10,
)
"""JSON-ish values, with the parts JSON cannot hold: big ints, NaN, lone surrogates, int keys."""


class Opaque:
    """An object no serialiser knows."""


def _sized(n: int) -> str:
    # orjson encodes a str of n ASCII characters in n + 2 bytes (its quotes).
    return "x" * (n - 2)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


_payloads = st.one_of(
    _json,
    st.builds(Opaque),
    st.sets(st.integers(), max_size=3),
    st.datetimes(timezones=st.just(UTC)),
    st.integers(min_value=DEFAULT_MAX_PAYLOAD - 4, max_value=DEFAULT_MAX_PAYLOAD + 4).map(_sized),
    st.integers(min_value=0, max_value=400).map(_nested),
)


_run_at = st.one_of(
    st.none(),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-11, minutes=-30))])),
    st.datetimes(),
    st.just(datetime.now(UTC) - timedelta(days=1)),
    _anything,
)
_backoff = st.fixed_dictionaries(
    {}, optional={"base": _numbers, "cap": _numbers, "jitter": st.booleans()}
)


@st.composite
def option_sets(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments of ``JobSpec``: each option absent, plausible or hostile."""
    candidates: dict[str, st.SearchStrategy[Any]] = {
        "priority": st.sampled_from(PRIORITY_CLASSES) | _texts | _anything,
        "group": st.sampled_from(["", "acme", "tenant-42"]) | _texts | _anything,
        "max_attempts": st.integers(1, 10) | _numbers | _anything,
        "timeout": st.floats(0.001, 600) | _numbers | _anything,
        "delay": st.sampled_from([0, 0.0, 5, 3600]) | _numbers | _anything,
        "run_at": _run_at,
        "dedup_key": st.sampled_from(["", "order-1"]) | _texts | _anything,
        "dedup_window": st.floats(0.001, 86400) | _numbers | _anything,
        "backoff": _backoff,
    }
    chosen = draw(st.sets(st.sampled_from(sorted(candidates))))
    options = {name: draw(candidates[name]) for name in sorted(chosen)}
    return options


job_types = st.sampled_from(["send_email", "x"]) | _texts | _anything


@st.composite
def jobs(draw: st.DrawFn) -> tuple[Any, Any, dict[str, Any]]:
    return draw(job_types), draw(_payloads), draw(option_sets())


# -- the property ------------------------------------------------------------------------------


def _build(job_type: Any, payload: Any, options: dict[str, Any]) -> JobSpec:
    options = dict(options)
    if "backoff" in options:
        options["backoff"] = Backoff(**options["backoff"])
    return JobSpec(job_type, payload, **options)


def _enqueue(queue: Queue, api: str, batch: list[tuple[Any, Any, dict[str, Any]]]) -> list[str]:
    if api == "enqueue":
        job_type, payload, options = batch[0]
        options = dict(options)
        if "backoff" in options:
            options["backoff"] = Backoff(**options["backoff"])
        return [queue.enqueue(job_type, payload, **options).id]
    if api == "enqueue_batch":
        job_type, _, options = batch[0]
        options = dict(options)
        if "backoff" in options:
            options["backoff"] = Backoff(**options["backoff"])
        return [r.id for r in queue.enqueue_batch(job_type, [p for _, p, _ in batch], **options)]
    return [r.id for r in queue.enqueue_many([_build(*job) for job in batch])]


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _claim_all(queue: Queue) -> dict[str, list[Any]]:
    """Lease every claimable job of the queue; id -> claim.lua's row for it."""
    rows: dict[str, list[Any]] = {}
    while True:
        raw = scripts.CLAIM.run(
            queue.client,
            queue.keys.script_keys,
            [100, 60_000, "fuzz/1", len(PRIORITY_CLASSES), *PRIORITY_CLASSES],
        )
        assert raw[3] == b"", raw[3]
        if len(raw) == 4:
            return rows
        # Each row: id, token, class, type, payload, attempts, max_attempts, timeout_ms, ...
        rows.update({row[0].decode(): row for row in raw[4:]})


def _check_stored(queue: Queue, spec: JobSpec, job_id: str, before_ms: int) -> str:
    """Compare the stored record with the spec; returns 'ready' or 'delayed'."""
    info = queue.get_job(job_id)
    assert info.payload == spec.encoded_payload(), "payload not stored byte for byte"
    assert (info.type, info.priority, info.group) == (spec.type, spec.priority, spec.group)
    assert info.max_attempts == spec.max_attempts
    due_ms = 0
    if spec.delay:
        due_ms = before_ms + round(spec.delay * 1000)
    elif spec.run_at is not None:
        due_ms = max(1, int(spec.run_at.timestamp() * 1000))
    if due_ms > _now_ms(queue.client):
        assert info.state == "delayed", f"due at {due_ms} but {info.state}"
        score = queue.client.zscore(queue.keys.delayed(spec.priority), job_id)
        assert score is not None, "a delayed job missing from its class's delayed set"
        # Stored due time within the enqueue's own round trip of what the producer asked for.
        assert due_ms - 5_000 <= score <= due_ms + 5_000, f"due {due_ms}, filed at {score}"
        return "delayed"
    return "ready"


@fuzz(scale=2.0)
@given(
    api=st.sampled_from(["enqueue", "enqueue_many", "enqueue_batch"]),
    batch=st.lists(jobs(), min_size=1, max_size=3),
)
@example(api="enqueue", batch=[("t", {}, {"max_attempts": 10**400})])  # OverflowError
@example(api="enqueue", batch=[("t", {}, {"delay": 1e300})])  # due time wrapped to the past
@example(api="enqueue", batch=[("t", {}, {"dedup_key": "k", "dedup_window": 1e300})])
@example(api="enqueue", batch=[("t", {}, {"group": "\ud800"})])  # raw UnicodeEncodeError
@example(api="enqueue_many", batch=[("t", {}, {}), ("t", "x" * (2**19 - 1), {})])
def test_options_are_refused_whole_or_stored_whole_and_claimed_back_byte_identical(
    budget_queue: Queue, api: str, batch: list[tuple[Any, Any, dict[str, Any]]]
) -> None:
    queue = budget_queue
    _empty(queue)
    before = snapshot(queue.client, queue.keys)
    before_ms = _now_ms(queue.client)
    refusal: str | None = None
    ids: list[str] = []
    try:
        ids = _enqueue(queue, api, batch)
    except InvalidJob as exc:
        refusal = str(exc)
    if refusal is not None:
        assert refusal, "an error that says nothing"
        assert snapshot(queue.client, queue.keys) == before, "a refused enqueue stored something"
        return

    # Accepted: every job is stored as specified, and every job due now is claimable with its
    # payload unchanged; the rest wait in their class's delayed set.
    if api == "enqueue_batch":
        template = _build(batch[0][0], None, batch[0][2])
        specs = [dataclasses.replace(template, payload=p) for _, p, _ in batch]
    elif api == "enqueue":
        job_type, payload, options = batch[0]
        specs = [_build(job_type, {} if payload is None else payload, options)]
    else:
        specs = [_build(*job) for job in batch]
    assert len(ids) == len(specs)
    first_of_key: dict[str, str] = {}
    due_now = {}
    for job_id, spec in zip(ids, specs, strict=True):
        if spec.dedup_key and first_of_key.setdefault(spec.dedup_key, job_id) != job_id:
            continue  # deduplicated onto an earlier job of the same call
        if _check_stored(queue, spec, job_id, before_ms) == "ready":
            due_now[job_id] = spec
    claimed = _claim_all(queue)
    assert set(due_now) <= set(claimed), "a job due now could not be claimed"
    for job_id, spec in due_now.items():
        row = claimed[job_id]
        assert row[4] == spec.encoded_payload(), "claimed payload differs from the stored one"
        assert int(row[6]) == spec.max_attempts
        assert int(row[7]) == round(spec.timeout * 1000)
    census(queue.client, queue.keys).assert_sound()
