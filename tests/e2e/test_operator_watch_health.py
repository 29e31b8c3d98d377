"""K03 with real 403s: the chart's ClusterRole loses ``watch`` on TaskQueues for a while.

A re-watch refused once is retried and recovers without a restart; refused for good, the
operator names the dead watcher and exits non-zero within 60 s instead of staying "healthy"
and blind. A short server-side watch timeout makes the operator re-watch every few seconds;
the permanent case waits out the operator's request retries (about 30 s).
"""

from __future__ import annotations

import time

import kubernetes.client as k8s
import pytest

from tests.e2e.conftest import E2E, OPERATOR_SA, OperatorProcess, record_timing, wait_for
from tests.support.k8s_cluster import AuditEntry

pytestmark = pytest.mark.k8s_api

WATCH_TIMEOUT = "3"


def test_refused_watch_recovers_once_allowed_and_a_dead_one_ends_the_process(op: E2E) -> None:
    op.restarts_operator = True
    op.forbidden_on_purpose.add(("watch", "taskqueues"))
    assert op.operator.stop() == 0
    blind = OperatorProcess(
        op.plane,
        op.tmp_path,
        "op-k03",
        extra_env={"CONVEYOR_OPERATOR_WATCH_TIMEOUT": WATCH_TIMEOUT},
    )
    blind.start().wait_serving()
    op.on_teardown(lambda: blind.running() and blind.stop())
    rbac = k8s.RbacAuthorizationV1Api(op.api)
    granted = op.api.sanitize_for_serialization(rbac.read_cluster_role(OPERATOR_SA))["rules"]
    revoked = [
        {**r, "verbs": [v for v in r["verbs"] if v != "watch"]}
        if r["resources"] == ["taskqueues"]
        else r
        for r in granted
    ]
    op.on_teardown(lambda: rbac.patch_cluster_role(OPERATOR_SA, {"rules": granted}))

    def refused_since(since: float) -> list[AuditEntry]:
        return [e for e in op.op_audit(since=since, verb="watch", resource="taskqueues", code=403)]

    # (c) Refused once, then allowed again: a TaskQueue created next is served, same process.
    began = time.time()
    rbac.patch_cluster_role(OPERATOR_SA, {"rules": revoked})
    wait_for(lambda: refused_since(began), 30, "a refused re-watch")
    rbac.patch_cluster_role(OPERATOR_SA, {"rules": granted})
    op.apply_tq(op.taskqueue())
    op.wait_deployments(timeout=60)
    assert blind.running()

    # (d) Refused for good: the process exits non-zero within 60 s and names the watcher.
    began = time.time()
    rbac.patch_cluster_role(OPERATOR_SA, {"rules": revoked})
    first = wait_for(lambda: refused_since(began), 30, "a refused re-watch")[0]
    assert blind.process is not None
    code = blind.process.wait(75)
    ended = time.time() - first.received.timestamp()
    record_timing("dead_watch_to_exit", ended)
    assert code != 0
    assert ended <= 60
    assert any(
        "taskqueues" in e.get("message", "") and "failed" in e.get("message", "")
        for e in blind.log(level="ERROR")
    )
