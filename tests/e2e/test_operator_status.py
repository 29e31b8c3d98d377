"""What the operator writes to the TaskQueue, and what it does not write.

K09: every status field is present and equals what the test reads from Redis, status goes
through the status subresource, and the printer columns show real values. K02 (a): a missing
Secret is retried with backoff and served soon after it appears. K02 (b): a steady state
writes nothing but, at most, a rare status heartbeat.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from conveyor.queue import ClassStats
from tests.e2e.conftest import (
    CLASSES,
    E2E,
    GROUP,
    PLURAL,
    POLL,
    VERSION,
    apply,
    get_raw,
    record_timing,
    wait_for,
)

pytestmark = pytest.mark.k8s_api

MARGIN = 1.5
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"
LAST_POLL = "conveyor_operator_last_poll_timestamp_seconds"


def _expected(row: ClassStats) -> dict[str, int]:
    return {
        "ready": row.ready,
        "delayedDue": row.due_delayed,
        "delayedFuture": row.future_delayed,
        "inFlight": row.in_flight,
        "dead": row.dead,
        "backlog": row.backlog,
    }


def test_every_status_field_is_written_through_the_status_subresource(op: E2E) -> None:
    """K09 with ready, due, future, in-flight and dead jobs across the four classes.

    The backlog is built before the TaskQueue exists, so that no class is held above its
    recommendation by the scale-down window when the status is compared.
    """
    op.enqueue(3, "critical")
    op.enqueue(2, "critical", delay=3600)
    op.enqueue(2, "high", payload={"seconds": 120})
    op.workers("high", concurrency=2)
    wait_for(lambda: _stats(op)["high"].in_flight == 2, 30, "two high jobs in flight")
    op.enqueue(4, "high")
    op.enqueue(2, "normal", job_type="fail", max_attempts=1)
    op.workers("normal", concurrency=2)
    wait_for(lambda: _stats(op)["normal"].dead == 2, 30, "two dead normal jobs")
    op.enqueue(2, "low", delay=0.5)
    time.sleep(1)  # the low jobs are due now: the operator's first poll promotes them
    op.apply_tq(op.taskqueue())
    op.wait_deployments()

    def matches() -> dict[str, Any] | None:
        status = op.status()
        stats = _stats(op)
        classes = status.get("classes", {})
        same = all(
            {k: classes.get(p, {}).get(k) for k in _expected(stats[p])} == _expected(stats[p])
            for p in CLASSES
        )
        settled = all(
            classes[p]["desiredReplicas"] == classes[p]["replicas"] == classes[p]["readyReplicas"]
            for p in CLASSES
            if p in classes
        )
        return status if same and settled else None

    status = wait_for(matches, 2 * POLL + 15, "status to equal the backlog read from Redis")
    stats = _stats(op)
    assert stats["low"].ready == 2, "the operator did not promote due delayed jobs"
    assert stats["critical"].future_delayed == 2
    for priority in CLASSES:
        row = status["classes"][priority]
        want = math.ceil(stats[priority].backlog / 10)
        assert row["desiredReplicas"] == want, (priority, row)
        assert row["replicas"] == op.scale(f"tq-{priority}") == want
        assert row["readyReplicas"] == want
        if want:
            assert row["lastScaleReason"].startswith("scale up"), row
            assert row["lastScaleTime"].endswith("Z")
    assert status["dead"] == 2
    assert status["replicas"] == status["readyReplicas"] == 3
    assert status["observedGeneration"] == op.get_tq()["metadata"]["generation"]
    assert status["activeOperator"] == op.operator.identity
    conditions = {c["type"]: c for c in status["conditions"]}
    assert {k: c["status"] for k, c in conditions.items()} == {
        "Ready": "True",
        "RedisReachable": "True",
        "Scaling": "True",
    }
    assert all(c["reason"] and c["lastTransitionTime"] for c in conditions.values())

    status_writes = op.op_audit(resource=PLURAL, subresource="status", verb="patch")
    assert status_writes, "no writes to the status subresource"
    assert op.op_audit(resource=PLURAL, verb="update") == []

    # Printer columns: backlog of every class and the replicas, non-empty.
    table = get_raw(op.api, f"/apis/{GROUP}/{VERSION}/namespaces/{op.ns}/{PLURAL}", TABLE)
    names = [c["name"] for c in table["columnDefinitions"]]
    (row,) = table["rows"]
    cells = dict(zip(names, row["cells"], strict=True))
    for column, priority in zip(("Critical", "High", "Normal", "Low"), CLASSES, strict=True):
        assert cells[column] == stats[priority].backlog, (column, cells)
    assert cells["Replicas"] == 3
    assert cells["Ready"] == "True"

    # A user's apply with a status block changes no status; a spec edit wipes none.
    body = op.taskqueue()
    body["status"] = {"replicas": 99, "dead": 99}
    apply(op.api, body, op.ns)
    body["spec"]["worker"]["image"] = "registry.example/conveyor-worker:e2e-2"
    apply(op.api, body, op.ns)
    time.sleep(2 * POLL)
    after = op.status()
    assert after["replicas"] == 3
    assert after["dead"] == 2
    assert after["classes"] == status["classes"]


def _stats(op: E2E) -> dict[str, ClassStats]:
    return {row.priority: row for row in op.jobs.stats()}


@pytest.mark.parametrize(
    ("missing_for", "gets"),
    [
        pytest.param(20.0, (4, 16), id="20s"),
        pytest.param(300.0, (5, 60), id="5min", marks=[pytest.mark.slow, pytest.mark.timeout(600)]),
    ],
)
def test_missing_secret_is_retried_with_backoff_and_served_once_it_appears(
    op: E2E, missing_for: float, gets: tuple[int, int]
) -> None:
    """K02 (a)."""
    op.apply_tq(op.taskqueue(redis={"secretRef": {"name": "late-creds"}}))
    began = time.time()

    ready = wait_for(
        lambda: (c := op.condition("Ready")) and c.get("status") == "False" and c,
        POLL + MARGIN + 2,
        "Ready=False",
    )
    assert ready["reason"] == "SecretNotFound"
    wait_for(lambda: time.time() > began + missing_for, missing_for + 5, "the wait", every=1)

    assert op.deployments() == {}
    events = [e for e in op.events() if e.type == "Warning"]
    assert [e.reason for e in events] == ["SecretNotFound"], [(e.reason, e.note) for e in events]
    assert events[0].count >= 2
    reads = [
        e.received.timestamp()
        for e in op.op_audit(verb="get", resource="secrets", name="late-creds")
    ]
    low, high = gets
    assert low <= len(reads) <= high, f"{len(reads)} GETs of the missing Secret"
    half = began + missing_for / 2
    assert sum(t < half for t in reads) > sum(t >= half for t in reads), "no backoff"

    op.secret(name="late-creds")
    appeared = time.time()
    op.wait_deployments(timeout=30)
    record_timing(f"deployments_after_late_secret_{int(missing_for)}s", time.time() - appeared)
    wait_for(
        lambda: op.condition("Ready").get("status") == "True", 30, "Ready=True after the Secret"
    )


@pytest.mark.parametrize(
    "steady",
    [
        pytest.param(15.0, id="15s"),
        pytest.param(300.0, id="5min", marks=[pytest.mark.slow, pytest.mark.timeout(600)]),
    ],
)
def test_steady_state_writes_nothing(op: E2E, steady: float) -> None:
    """K02 (b), with 3 TaskQueues at a constant backlog."""
    names = ("tq", "tq2", "tq3")
    for name in names:
        op.apply_tq(op.taskqueue(name))
    op.enqueue(25, "normal")
    for name in names:
        op.wait_deployments(name)
        op.wait_scale(f"{name}-normal", 3, POLL + 10)
    wait_for(
        lambda: all(
            op.status(n).get("readyReplicas") == 3 and op.status(n).get("classes") for n in names
        ),
        30,
        "every status settled",
    )
    time.sleep(2 * POLL)

    start = time.time()
    polled = {n: op.operator.metric(LAST_POLL, namespace=op.ns, taskqueue=n) or 0 for n in names}
    time.sleep(steady)
    writes = [
        e for e in op.op_audit(since=start) if e.verb in ("create", "update", "patch", "delete")
    ]
    by_kind: dict[str, int] = {}
    for entry in writes:
        if entry.resource == "leases":
            continue
        key = f"{entry.verb} {entry.resource}/{entry.subresource or ''}"
        by_kind[key] = by_kind.get(key, 0) + 1
    status_writes = by_kind.pop(f"patch {PLURAL}/status", 0)
    assert status_writes <= len(names) * math.ceil(steady / 60), by_kind
    assert by_kind == {}, f"writes in a steady state: {by_kind}"
    for name in names:
        latest = op.operator.metric(LAST_POLL, namespace=op.ns, taskqueue=name) or 0
        assert latest >= polled[name] + steady - 3 * POLL, f"{name} stopped polling"
