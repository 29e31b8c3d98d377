"""Autoscaling from Redis, watched through the Deployments' replicas on a real API server.

Scale-up within one poll, scale-down only after the stabilization window (shadow workers drain
the backlog), no flapping on a spiky backlog, scale to zero and back (K15 a-d), and busy pods
kept on scale-down through pod deletion costs (B28, K14 in a reduced form). Reaction times are
measured from Redis ``TIME`` at the enqueue to the replicas change seen by a watch.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import kubernetes.client as k8s
import pytest
from kubernetes import watch

from tests.e2e.conftest import (
    CLASSES,
    DELETION_COST,
    DOWN_WINDOW,
    E2E,
    POLL,
    record_timing,
    wait_for,
)
from tests.support.workers import Ledger

pytestmark = pytest.mark.k8s_api

MARGIN = 1.5
"""Slack on top of a poll for the operator's own round trips on a loaded 2-core machine."""


def test_backlog_scales_the_right_class_up_within_one_poll(op: E2E) -> None:
    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    histories = {p: op.history(f"tq-{p}") for p in CLASSES}

    enqueued = op.enqueue(25, "high")
    op.wait_scale("tq-high", 3, POLL + 10)
    reaction = histories["high"].wait_first(lambda r: r == 3, after=enqueued - 1)
    record_timing("scale_up_0_to_3", reaction - enqueued)
    assert reaction - enqueued <= POLL + MARGIN

    # Two more polls move nothing else.
    time.sleep(2 * POLL)
    for priority in ("critical", "normal", "low"):
        assert histories[priority].replicas() == [0], priority
        assert op.scale_writes(f"tq-{priority}") == []
    assert histories["high"].replicas() == [0, 3]
    assert len(op.scale_writes("tq-high")) == 1


def test_drained_backlog_scales_down_only_after_the_stabilization_window(op: E2E) -> None:
    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    history = op.history("tq-normal")
    backlog = op.watch_backlog("normal")

    op.enqueue(30, "normal", payload={"seconds": 0.3})
    op.wait_scale("tq-normal", 3, POLL + 10)
    shadows = op.shadow_workers("tq-normal", "normal", concurrency=4)
    wait_for(lambda: len(shadows.by_pod) == 3, 30, "three shadow workers")
    wait_for(lambda: backlog and backlog[-1][1] == 0, 60, "the workers to drain the backlog")
    op.wait_scale("tq-normal", 0, DOWN_WINDOW + 15)
    wait_for(lambda: history.replicas()[-1] == 0, 10, "the watch to see zero")

    below_peak = next(t for t, b in backlog if math.ceil(b / 10) < 3)
    empty = next(t for t, b in backlog if t >= below_peak and b == 0)
    changes = history.changes()
    peak_at = next(t for t, r in changes if r == 3)
    first_down = next(t for t, r in changes if t > peak_at and r < 3)
    zero_at = next(t for t, r in changes if t > peak_at and r == 0)
    # The operator saw the peak at most a poll before the backlog first fell below it, and the
    # window keeps that peak for DOWN_WINDOW seconds.
    assert first_down >= below_peak - POLL + DOWN_WINDOW - 0.3, (changes, below_peak)
    record_timing("scale_down_after_window_extra", zero_at - empty - DOWN_WINDOW)
    assert zero_at <= empty + DOWN_WINDOW + POLL + MARGIN, (changes, empty)
    assert history.replicas() in ([0, 3, 0], [0, 3, 2, 0], [0, 3, 1, 0], [0, 3, 2, 1, 0])


def test_spiky_backlog_causes_no_flapping(op: E2E) -> None:
    window = 8
    op.apply_tq(op.taskqueue(scaling={"scaleDownStabilizationSeconds": window}))
    op.wait_deployments()
    history = op.history("tq-high")
    op.workers("high", concurrency=10)

    # Bursts of 30 jobs of 0.3 s every 2.5 s: each drains in about a second, so the backlog the
    # operator polls swings between 30 and 0.
    spikes = []
    for _ in range(5):
        spikes.append(op.enqueue(30, "high", payload={"seconds": 0.3}))
        time.sleep(2.5)
    last_spike = spikes[-1]
    op.wait_scale("tq-high", 0, window + 20)
    wait_for(lambda: history.replicas()[-1] == 0, 10, "the watch to see zero")

    changes = history.changes()
    ups = [r for _, r in changes]
    peak = ups.index(max(ups))
    assert ups[: peak + 1] == sorted(ups[: peak + 1]), f"down between spikes: {changes}"
    assert ups[peak:] == sorted(ups[peak:], reverse=True), f"up after a scale-down: {changes}"
    first_down = next(t for t, r in changes[peak:] if r < max(ups))
    assert first_down >= last_spike + window - POLL - 0.3, changes
    assert len(op.scale_writes("tq-high")) == len(changes) - 1 <= 4


def test_class_scales_from_zero_on_activation_and_back_to_zero_after_the_window(op: E2E) -> None:
    """K15 (a) activation 0, (b) activation 5, (c) a delayed job at zero; then back to zero."""
    classes = {"high": {"activationBacklog": 5}}
    op.apply_tq(op.taskqueue(classes=classes))
    op.wait_deployments()
    low, high, critical = (op.history(f"tq-{p}") for p in ("low", "high", "critical"))

    # (c) is due in 4 s; (a) and (b) start at once, in parallel.
    delay = 4.0
    delayed_at = op.enqueue(1, "critical", delay=delay)
    first_low = op.enqueue(1, "low")
    op.enqueue(3, "high")

    op.wait_scale("tq-low", 1, POLL + 10)
    up = low.wait_first(lambda r: r == 1)
    record_timing("scale_from_zero_one_job", up - first_low)
    assert up - first_low <= POLL + 1 + MARGIN

    # (b) 3, then 5 jobs stay below the activation threshold for 3 polls.
    time.sleep(3 * POLL)
    op.enqueue(2, "high")
    time.sleep(3 * POLL)
    assert high.replicas() == [0]
    sixth = op.enqueue(1, "high")
    op.wait_scale("tq-high", 1, POLL + 10)
    activated = high.wait_first(lambda r: r == 1)
    record_timing("scale_from_zero_activation", activated - sixth)
    assert activated - sixth <= POLL + MARGIN

    # (c) a future job is not work yet; once due it is.
    op.wait_scale("tq-critical", 1, delay + POLL + 10)
    due = critical.wait_first(lambda r: r == 1)
    assert due >= delayed_at + delay - 0.2, "scaled up for a job that was not due yet"
    record_timing("scale_from_zero_delayed_job_after_due", due - (delayed_at + delay))
    assert due <= delayed_at + delay + POLL + MARGIN

    # Back to zero: a worker runs the low job; zero comes only a whole window after it ended.
    ledger = Ledger.at(op.redis_url, f"ledger:{op.queue}")
    op.on_teardown(ledger.close)
    op.workers("low")
    finished = ledger.wait_rows(1, 30, outcome="ok")[0]["t_end"]
    op.wait_scale("tq-low", 0, DOWN_WINDOW + 15)
    zero = low.wait_first(lambda r: r == 0, after=up)
    assert zero >= finished + DOWN_WINDOW - POLL - 0.3
    record_timing("scale_to_zero_after_window_extra", zero - finished - DOWN_WINDOW)
    assert zero <= finished + DOWN_WINDOW + POLL + MARGIN


def test_operator_restarted_at_zero_scales_waiting_work_up_within_two_polls(op: E2E) -> None:
    """K15 (d)."""
    op.restarts_operator = True
    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    wait_for(lambda: op.status().get("classes"), 10, "a first status")
    assert op.operator.stop() == 0

    op.enqueue(4, "low")
    history = op.history("tq-low")
    started = time.time()
    op.operator.start().wait_serving()
    serving = time.time()
    op.wait_scale("tq-low", 1, 2 * POLL + 15)
    up = history.wait_first(lambda r: r == 1)
    record_timing("operator_start_to_serving", serving - started)
    record_timing("restart_serving_to_scale_up", up - serving)
    assert up - serving <= 2 * POLL + MARGIN


def test_idle_pods_get_a_lower_deletion_cost_and_busy_pods_survive_scale_down(op: E2E) -> None:
    """B28 and K14 in a reduced form: 5 pods, 2 of them busy with long jobs, desired 2."""
    classes = {"normal": {"maxReplicas": 5, "targetBacklogPerReplica": 1}}
    op.apply_tq(op.taskqueue(classes=classes, scaling={"scaleDownStabilizationSeconds": 3}))
    op.wait_deployments()
    costs = _record_costs(op, "tq-normal")
    ledger = Ledger.at(op.redis_url, f"ledger:{op.queue}")
    op.on_teardown(ledger.close)

    # The long jobs go first, so the first two workers up take them and stay busy.
    op.enqueue(2, "normal", payload={"seconds": 120})
    op.enqueue(3, "normal", payload={"seconds": 1})
    op.wait_scale("tq-normal", 5, POLL + 10)
    shadows = op.shadow_workers("tq-normal", "normal", concurrency=1)
    wait_for(lambda: len(shadows.heartbeating()) == 5, 60, "five shadow workers heartbeating")
    ledger.wait_rows(3, 60, outcome="ok")
    uids = dict(shadows.uids)
    done = {r["job_id"] for r in ledger.rows(outcome="ok")}
    long_pids = {r["pid"] for r in ledger.rows(outcome="started") if r["job_id"] not in done}
    busy = {pod for pod, w in shadows.by_pod.items() if long_pids & set(w.children())}
    assert len(busy) == 2, (long_pids, {p: w.children() for p, w in shadows.by_pod.items()})
    op.wait_scale("tq-normal", 2, 3 + 2 * POLL + 10)

    (write,) = op.scale_writes("tq-normal", since=op.t0)[-1:]
    patches = [
        e for e in op.op_audit(verb="patch", resource="pods") if e.received <= write.received
    ]
    assert patches, "no deletion costs were written before the scale-down"
    settle = (write.received - max(e.received for e in patches)).total_seconds()
    assert settle >= 1.0, f"scale write only {settle:.2f}s after the last annotation"
    at_write = {pod: _cost_before(costs, pod, write.received.timestamp()) for pod in uids}
    idle = set(uids) - busy
    assert max(at_write[p] for p in idle) < min(at_write[p] for p in busy), at_write

    wait_for(lambda: len(op.pods("tq-normal")) == 2, 30, "two pods left")
    survivors = {p.metadata.name: p.metadata.uid for p in op.pods("tq-normal")}
    assert survivors == {p: uids[p] for p in busy}
    # K01(d): nothing Conveyor touched carries a finalizer or Kopf state.
    for pod in op.pods("tq-normal"):
        assert not pod.metadata.finalizers
        assert not [a for a in pod.metadata.annotations or {} if "kopf" in a]
    for dep in op.deployments().values():
        assert not dep.metadata.finalizers
        assert not [a for a in dep.metadata.annotations or {} if "kopf" in a]
    assert not op.get_tq()["metadata"].get("finalizers")


def _record_costs(op: E2E, deployment: str) -> list[tuple[float, str, int | None]]:
    """(time, pod, deletion cost) for every change of a pod of ``deployment``."""
    seen: list[tuple[float, str, int | None]] = []
    stop = threading.Event()
    tq, priority = deployment.rsplit("-", 1)

    def run() -> None:
        with op.cluster.api_client() as api:
            core = k8s.CoreV1Api(api)
            while not stop.is_set():
                stream = watch.Watch().stream(
                    core.list_namespaced_pod,
                    op.ns,
                    label_selector=f"conveyor.dev/taskqueue={tq},conveyor.dev/class={priority}",
                    timeout_seconds=2,
                )
                for event in stream:
                    meta = event["object"].metadata
                    cost = (meta.annotations or {}).get(DELETION_COST)
                    seen.append((time.time(), meta.name, int(cost) if cost else None))
                    if stop.is_set():
                        break

    op.background(run, stop, f"costs-{deployment}")
    return seen


def _cost_before(costs: list[tuple[float, str, Any]], pod: str, at: float) -> int:
    values = [c for t, p, c in costs if p == pod and t <= at + 0.5]
    assert values, f"no event of {pod} before the scale write"
    assert values[-1] is not None, f"{pod} had no deletion cost at the scale write"
    return int(values[-1])


def test_a_busy_worker_that_keeps_its_class_drained_is_never_scaled_to_zero(op: E2E) -> None:
    """K15 (e): one worker, a 0.5 s job every second: ready stays about 0, but the work is real.

    Zero may come only once ready, due and in flight have all been 0 for a whole scale-down
    window, measured here from 50 ms samples of the backlog and the ledger's last job end.
    """
    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    ledger = Ledger.at(op.redis_url, f"ledger:{op.queue}")
    op.on_teardown(ledger.close)
    op.workers("low", concurrency=1)
    history = op.history("tq-low")
    samples = op.watch_backlog("low")

    arrivals = 6 * DOWN_WINDOW
    first = op.enqueue(1, "low", payload={"seconds": 0.5})
    for _ in range(arrivals - 1):
        time.sleep(1.0)
        op.enqueue(1, "low", payload={"seconds": 0.5})
    last = time.time()
    up = history.wait_first(lambda r: r >= 1)
    record_timing("scale_from_zero_steady_trickle", up - first)
    assert up - first <= POLL + 1 + MARGIN

    finished = max(r["t_end"] for r in ledger.wait_rows(arrivals, 30, outcome="ok"))
    op.wait_scale("tq-low", 0, DOWN_WINDOW + 15)
    zero = history.wait_first(lambda r: r == 0, after=up)

    # The scenario is the one the case describes: in flight most of the time, ready about 0.
    during = [backlog for t, backlog in samples if first + 1 <= t <= last]
    assert during
    assert max(during) <= 2, max(during)
    busy_share = sum(1 for b in during if b > 0) / len(during)
    assert busy_share >= 0.3, busy_share
    assert history.replicas() == [0, 1, 0], history.changes()
    last_busy = max(t for t, backlog in samples if backlog > 0)
    assert last_busy >= finished - 0.2, "the samples missed the last job"
    assert zero >= last_busy + DOWN_WINDOW - POLL - 0.3, (zero - last_busy, history.changes())
    record_timing("steady_trickle_end_to_zero_extra", zero - finished - DOWN_WINDOW)
    assert zero <= finished + DOWN_WINDOW + POLL + MARGIN
