"""What a producer may say about a job, checked before anything reaches Redis (B21 c, B25)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis

from conveyor.errors import InvalidJob, PayloadTooLarge
from conveyor.job import DEFAULT_MAX_PAYLOAD, Backoff, JobSpec, encode_payload
from conveyor.keys import PRIORITY_CLASSES
from conveyor.local import free_port
from conveyor.queue import Queue


@pytest.fixture
def unreachable_queue() -> Queue:
    """A queue whose Redis does not exist: any call that reached it would raise BackendError,
    so an InvalidJob proves the job was refused before anything was sent."""
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    return Queue(client, "q")


@pytest.mark.parametrize("priority", [50, -1, "urgent", "", "Critical", None, 0])
def test_a_priority_outside_the_four_classes_is_refused(priority: Any) -> None:
    with pytest.raises(InvalidJob, match="priority must be one of"):
        JobSpec("t", priority=priority)


@pytest.mark.parametrize("priority", [50, -1, "urgent"])
def test_a_refused_priority_never_reaches_redis(unreachable_queue: Queue, priority: Any) -> None:
    with pytest.raises(InvalidJob):
        unreachable_queue.enqueue("t", {}, priority=priority)
    with pytest.raises(InvalidJob):
        unreachable_queue.enqueue_batch("t", [{}, {}], priority=priority)


def test_every_named_class_is_accepted_and_normal_is_the_default() -> None:
    assert JobSpec("t").priority == "normal"
    for priority in PRIORITY_CLASSES:
        assert JobSpec("t", priority=priority).priority == priority
    assert PRIORITY_CLASSES == ("critical", "high", "normal", "low")


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"max_attempts": 1.5},
        {"max_attempts": True},
        {"max_attempts": "3"},
        {"timeout": 0},
        {"timeout": math.inf},
        {"timeout": math.nan},
        {"delay": -1},
        {"delay": math.inf},
        {"dedup_window": 0},
        {"group": 7},
        {"group": "a\nb"},
        {"group": "g" * 201},
        {"dedup_key": "k\0"},
    ],
)
def test_invalid_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidJob):
        JobSpec("t", **options)


@pytest.mark.parametrize("job_type", ["", "a\rb", 3])
def test_a_job_needs_a_one_line_type(job_type: Any) -> None:
    with pytest.raises(InvalidJob):
        JobSpec(job_type)


def test_run_at_must_be_timezone_aware_and_excludes_delay() -> None:
    later = datetime.now(UTC) + timedelta(minutes=1)
    with pytest.raises(InvalidJob, match="timezone-aware"):
        JobSpec("t", run_at=later.replace(tzinfo=None))
    with pytest.raises(InvalidJob, match="either delay or run_at"):
        JobSpec("t", run_at=later, delay=5)
    assert JobSpec("t", run_at=later).template()[7] == int(later.timestamp() * 1000)


@pytest.mark.parametrize(
    ("base", "cap"),
    [(-1, 10), (10, 5), (1, math.inf), (math.nan, 10), (1, math.nan)],
)
def test_backoff_needs_zero_at_most_base_at_most_a_finite_cap(base: float, cap: float) -> None:
    with pytest.raises(InvalidJob, match="backoff"):
        Backoff(base, cap)


def test_backoff_bounds_travel_in_milliseconds() -> None:
    template = JobSpec("t", backoff=Backoff(0.25, 7.5, jitter=False)).template()
    assert template[10:13] == (250, 7500, 0)
    assert JobSpec("t").template()[10:13] == (1000, 3_600_000, 1)


def test_a_payload_at_the_limit_is_accepted_and_one_byte_more_is_refused() -> None:
    text = "x" * (DEFAULT_MAX_PAYLOAD - 2)  # the JSON string adds two quotes
    assert len(encode_payload(text)) == DEFAULT_MAX_PAYLOAD
    with pytest.raises(PayloadTooLarge) as refused:
        encode_payload(text + "x")
    assert (refused.value.size, refused.value.limit) == (DEFAULT_MAX_PAYLOAD + 1, 512 * 1024)


def test_the_payload_limit_is_the_queues_setting() -> None:
    assert encode_payload({"a": 1}, max_payload=7) == b'{"a":1}'
    with pytest.raises(PayloadTooLarge):
        encode_payload({"a": 10}, max_payload=7)


def test_an_oversized_payload_never_reaches_redis(unreachable_queue: Queue) -> None:
    with pytest.raises(PayloadTooLarge):
        unreachable_queue.enqueue("t", "x" * DEFAULT_MAX_PAYLOAD)
    # One bad job in a batch refuses the whole batch before anything is sent.
    with pytest.raises(PayloadTooLarge):
        unreachable_queue.enqueue_batch("t", [{}, "x" * DEFAULT_MAX_PAYLOAD])


@pytest.mark.parametrize("payload", [b"raw bytes", {1, 2}, object()])
def test_a_payload_that_is_not_json_is_refused(payload: Any) -> None:
    with pytest.raises(InvalidJob, match="JSON"):
        encode_payload(payload)


def test_the_payload_is_encoded_once_to_the_bytes_a_handler_will_decode() -> None:
    payload = {"to": "ada@example.com", "amount": 12.5, "name": "Ünïcødé", "n": [1, None]}
    encoded = JobSpec("t", payload).encoded_payload()
    assert encoded == orjson.dumps(payload)
    assert orjson.loads(encoded) == payload
