"""B31: two operator processes, one Lease: exactly one acts, and the other takes over.

Both run with the same ServiceAccount; each names itself in its client's User-Agent, so the
audit log attributes every request to a process.
"""

from __future__ import annotations

import signal
import time

import kubernetes.client as k8s
import pytest

from tests.e2e.conftest import (
    E2E,
    OPERATOR_NAMESPACE,
    PLURAL,
    POLL,
    OperatorProcess,
    record_timing,
    wait_for,
)

pytestmark = pytest.mark.k8s_api

LEASE = 6.0
"""Lease duration of the two operators (the cases' 15 s, shortened to keep the tier fast)."""
MARGIN = 1.5


def _leader(a: OperatorProcess, b: OperatorProcess) -> tuple[OperatorProcess, OperatorProcess]:
    leading = [p for p in (a, b) if p.log(event="leading")]
    assert len(leading) == 1, "both operators lead at once"
    return (a, b) if leading[0] is a else (b, a)


def test_two_operators_one_acts_and_the_other_takes_over_within_the_lease(op: E2E) -> None:
    op.restarts_operator = True
    assert op.operator.stop() == 0
    plane = op.plane
    a = OperatorProcess(plane, op.tmp_path, "op-a", lease_duration=LEASE).start()
    b = OperatorProcess(plane, op.tmp_path, "op-b", lease_duration=LEASE).start()
    op.on_teardown(lambda: [p.stop() for p in (a, b) if p.running()])
    wait_for(lambda: a.log(event="leading") or b.log(event="leading"), 60, "a leader")
    leader, standby = _leader(a, b)
    leader.wait_serving()
    wait_for(lambda: standby.log(event="lease_waiting"), 30, "the standby to wait")
    assert leader.probe("/readyz") == 200
    assert standby.probe("/readyz") == 503
    assert standby.probe("/healthz") == 200

    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    op.enqueue(20, "normal")
    op.wait_scale("tq-normal", 2, POLL + 10)
    wait_for(lambda: op.status().get("activeOperator") == leader.identity, 10, "activeOperator")

    # Only the leader writes; the standby only reads the Lease. Both may find the Lease free
    # at start (the previous operator released it) and race to take it: the loser's update
    # is refused by the compare-and-swap (409) and changes nothing.
    mine = op.op_audit(since=a.started_at)
    standby_agent = f"conveyor-operator/{standby.identity}"
    from_standby = {
        (e.verb, e.resource)
        for e in mine
        if e.user_agent.startswith(standby_agent)
        and not (e.verb == "update" and e.resource == "leases" and e.code == 409)
    }
    assert from_standby <= {("get", "leases")}, from_standby
    writes = [
        e
        for e in mine
        if e.verb in ("create", "patch", "update") and e.resource in ("deployments", PLURAL)
    ]
    assert writes, "the leader wrote nothing"

    # Kill the leader without a chance to release the Lease.
    leader.stop(signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: standby.log(event="leading"), LEASE + 5 + MARGIN, "the standby to take over")
    took_over = time.time()
    record_timing("leader_failover", took_over - killed)
    assert took_over - killed <= LEASE + 5
    lease = k8s.CoordinationV1Api(op.api).read_namespaced_lease(
        "conveyor-operator", OPERATOR_NAMESPACE
    )
    assert lease.spec.holder_identity == standby.identity

    op.enqueue(20, "normal")
    op.wait_scale("tq-normal", 4, POLL + 15)
    wait_for(
        lambda: op.status().get("activeOperator") == standby.identity,
        POLL + MARGIN,
        "activeOperator to name the new leader",
    )
    assert standby.stop() == 0
