"""K03 (a) and (b): the operator's connection to the apiserver broken by proxies the test owns.

(a) A TCP proxy blackholes every connection open at one instant (sockets stay open, nothing is
    forwarded, as when a middlebox forgets a flow) while new connections pass: a TaskQueue
    created 5 s later must be served within the watch client timeout plus one poll. A watch
    that stays blind (every re-watch of TaskQueues swallowed by the HTTP fault proxy) must turn
    the liveness probe unhealthy and name the watch; an apiserver that cannot be reached at all
    costs the Lease and ends the process non-zero, it does not hang "healthy".
(b) The HTTP fault proxy (TLS-terminating, serving a cert of the cluster's CA) answers the next
    3 TaskQueue watches with 429 and ``Retry-After: 1``: a TaskQueue created meanwhile is
    served within 30 s, through a re-watch the audit log shows, without a restart.

Each test stops the session operator and runs its own, whose kubeconfig (the chart's
ServiceAccount token) points at the proxy. A short watch timeout keeps the tier fast; the
bounds below are derived from it exactly as the production ones are from 60 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest

from tests.e2e.conftest import E2E, PLURAL, POLL, OperatorProcess, record_timing, wait_for
from tests.support.http_fault_proxy import HttpFaultProxy, watches
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.k8s_api

WATCH_TIMEOUT = 6
CLIENT_TIMEOUT = WATCH_TIMEOUT + 10
"""Kopf's client-side bound on one watch request (see handlers.configure)."""
REQUEST_TIMEOUT = 5
LEASE_DURATION = 15.0
GUARD_GRACE = WATCH_TIMEOUT + 20
GUARD_INTERVAL = 5
EXIT_LEASE_LOST = 3


@contextmanager
def operator_via(op: E2E, server: str, identity: str) -> Iterator[OperatorProcess]:
    """The test's own operator, reaching the apiserver at ``server``; stopped on exit."""
    op.restarts_operator = True
    assert op.operator.stop() == 0
    operator = OperatorProcess(
        op.plane,
        op.tmp_path,
        identity,
        lease_duration=LEASE_DURATION,
        kubeconfig=op.cluster.via(op.plane.operator_kubeconfig, server),
        extra_env={
            "CONVEYOR_OPERATOR_WATCH_TIMEOUT": str(WATCH_TIMEOUT),
            "CONVEYOR_OPERATOR_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        },
    )
    try:
        yield operator.start().wait_serving()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- operator log ---\n{operator.tail(120)}") from exc
    finally:
        if operator.running():
            operator.stop()


@contextmanager
def fault_proxy(op: E2E) -> Iterator[HttpFaultProxy]:
    cert, key = op.cluster.server_cert("fault-proxy")
    with HttpFaultProxy(op.cluster.server, op.cluster.ca_file, cert, key) as proxy:
        yield proxy


def test_blackholed_connections_are_abandoned_in_time(op: E2E) -> None:
    with (
        TcpProxy(op.cluster.api_port) as proxy,
        operator_via(op, f"https://127.0.0.1:{proxy.port}", "op-k03a") as operator,
    ):
        op.apply_tq(op.taskqueue("tq1"))
        op.wait_deployments("tq1")
        # At least the TaskQueue and Deployment watches, plus whatever the pools keep idle.
        assert proxy.freeze_open() >= 2
        time.sleep(5)
        op.apply_tq(op.taskqueue("tq2"))
        created = time.monotonic()
        op.wait_deployments("tq2", timeout=CLIENT_TIMEOUT + POLL + 30)
        took = time.monotonic() - created
        record_timing("blackholed_watch_to_reconcile", took)
        assert took <= CLIENT_TIMEOUT + POLL, f"tq2 served after {took:.1f}s"
        # Recovered before the watch guard's grace ran out: no false alarm.
        assert operator.probe("/healthz") == 200
        assert operator.problems() == []

        # Nothing gets through any more, new connections included: the Lease cannot be
        # renewed, and the leader must stop acting and exit before it may be taken over,
        # not wait on its dead connections forever.
        proxy.set_mode("blackhole")
        cut, cut_wall = time.monotonic(), time.time()
        assert operator.process is not None
        code = operator.process.wait(LEASE_DURATION + 2 * REQUEST_TIMEOUT + 30)
        record_timing("unreachable_apiserver_to_exit", time.monotonic() - cut)
        assert code == EXIT_LEASE_LOST
        (lost,) = operator.log(event="lease_lost")
        # It stopped acting while the Lease, last renewed before the cut, was still its own.
        lost_at = datetime.strptime(lost["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        assert lost_at - cut_wall <= LEASE_DURATION


def test_a_watch_that_stays_blind_fails_liveness(op: E2E) -> None:
    with fault_proxy(op) as proxy, operator_via(op, proxy.url, "op-k03-blind") as operator:
        op.apply_tq(op.taskqueue("tq1"))
        op.wait_deployments("tq1")
        swallowed = proxy.hang(watches(PLURAL))
        # The open watch ends within the server timeout; every re-watch from then on hangs.
        wait_for(lambda: swallowed.hits, WATCH_TIMEOUT + 10, "a swallowed re-watch")
        op.apply_tq(op.taskqueue("tq2"))
        created = time.monotonic()
        wait_for(lambda: swallowed.hits >= 2, CLIENT_TIMEOUT + 10, "the next swallowed re-watch")
        assert not op.deployments("tq2"), "tq2 was served although its watch was blind"
        wait_for(
            lambda: operator.probe("/healthz") == 503,
            GUARD_GRACE + 2 * GUARD_INTERVAL + 10,
            "the liveness probe to fail",
        )
        record_timing("blind_watch_to_unhealthy", time.monotonic() - created)
        assert time.monotonic() - created <= 60
        assert operator.running(), "the operator died instead of reporting itself blind"
        assert any(
            e["message"].startswith(f"the {PLURAL} watch is blind: {op.ns}/tq2")
            for e in operator.log(event="watch_blind")
        )

        # The watch gets through again: tq2 is served and the probe heals, no restart.
        proxy.clear()
        op.wait_deployments("tq2", timeout=CLIENT_TIMEOUT)
        wait_for(
            lambda: operator.probe("/healthz") == 200,
            2 * GUARD_INTERVAL + 5,
            "the liveness probe to recover",
        )
        assert any(PLURAL in e["message"] for e in operator.log(event="watch_recovered"))
        assert operator.problems() == []


def test_throttled_watches_are_retried(op: E2E) -> None:
    with fault_proxy(op) as proxy, operator_via(op, proxy.url, "op-k03b") as operator:
        pid = operator.pid
        throttled = proxy.answer(watches(PLURAL), 429, times=3, headers={"Retry-After": "1"})
        # Once the open watch has ended, so that only a re-watch can deliver tq3.
        wait_for(lambda: throttled.hits, WATCH_TIMEOUT + 10, "a throttled re-watch")
        op.apply_tq(op.taskqueue("tq3"))
        created = time.monotonic()
        op.wait_deployments("tq3", timeout=30)
        record_timing("throttled_watch_to_reconcile", time.monotonic() - created)
        assert throttled.hits == 3
        last_429 = proxy.outcomes("429", watches(PLURAL))[-1][0]
        rewatch = op.op_audit(since=last_429, verb="watch", resource=PLURAL, stage=None)
        assert rewatch, "no re-watch of taskqueues reached the apiserver after the 429s"
        assert operator.running()
        assert operator.pid == pid
        assert operator.probe("/healthz") == 200
        assert operator.problems() == []
