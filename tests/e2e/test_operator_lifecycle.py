"""Creation and deletion: owner references, garbage collection and no finalizers (K01, K11).

Conveyor cleans up through owner references only, so TaskQueues, their namespaces and their
worker pods delete promptly whether or not the operator runs.
"""

from __future__ import annotations

import time
from typing import Any

import kubernetes.client as k8s
import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import CLASSES, E2E, GROUP, PLURAL, POLL, VERSION, record_timing, wait_for

pytestmark = pytest.mark.k8s_api


def _gone(read: Any) -> bool:
    try:
        read()
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def _children(op: E2E, ns: str | None = None) -> list[Any]:
    namespace = ns or op.ns
    selector = "conveyor.dev/taskqueue=tq"
    return [
        *op.apps.list_namespaced_deployment(namespace, label_selector=selector).items,
        *op.core.list_namespaced_service(namespace, label_selector=selector).items,
    ]


def _delete_tq(op: E2E, policy: str | None = None, ns: str | None = None) -> None:
    body = k8s.V1DeleteOptions(propagation_policy=policy) if policy else None
    op.custom.delete_namespaced_custom_object(GROUP, VERSION, ns or op.ns, PLURAL, "tq", body=body)


def test_children_are_owned_by_their_taskqueue_and_follow_every_deletion_policy(op: E2E) -> None:
    """K11 (a-d)."""
    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    wait_for(lambda: len(_children(op)) == 5, 10, "4 Deployments and the Service")

    # (a) exactly one, correct, controlling owner reference on every child.
    uid = op.get_tq()["metadata"]["uid"]
    for child in _children(op):
        (ref,) = child.metadata.owner_references
        assert (ref.api_version, ref.kind, ref.name, ref.uid) == (
            f"{GROUP}/{VERSION}",
            "TaskQueue",
            "tq",
            uid,
        )
        assert ref.controller is True
        assert ref.block_owner_deletion is True
        assert child.metadata.namespace == op.ns
    invalid = op.core.list_event_for_all_namespaces(
        field_selector="reason=OwnerRefInvalidNamespace"
    )
    assert invalid.items == []

    # (b) foreground: the TaskQueue waits for its children, then everything is gone.
    _delete_tq(op, "Foreground")
    tq = op.get_tq()
    assert "foregroundDeletion" in tq["metadata"]["finalizers"]
    deleting = time.time()
    wait_for(lambda: _gone(op.get_tq) and not _children(op), 30, "foreground deletion")
    record_timing("foreground_delete_complete", time.time() - deleting)
    created = [e for e in op.op_audit(since=deleting, verb="create", resource="deployments")]
    assert created == [], "the operator re-created children of a TaskQueue being deleted"

    # (c) orphan: the Deployments stay; a new TaskQueue of the same name adopts exactly them.
    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    before = {d.metadata.name: d.metadata.uid for d in op.deployments().values()}
    _delete_tq(op, "Orphan")
    wait_for(lambda: _gone(op.get_tq), 30, "the orphaning delete")
    wait_for(
        lambda: all(not d.metadata.owner_references for d in op.deployments().values()),
        30,
        "the orphaned Deployments to lose their owner reference",
    )
    assert {d.metadata.name: d.metadata.uid for d in op.deployments().values()} == before
    op.apply_tq(op.taskqueue())
    new_uid = op.get_tq()["metadata"]["uid"]
    wait_for(
        lambda: all(
            [r.uid for r in d.metadata.owner_references or ()] == [new_uid]
            for d in op.deployments().values()
        ),
        10,
        "the new TaskQueue to adopt the orphans",
    )
    assert {d.metadata.name: d.metadata.uid for d in op.deployments().values()} == before

    # (d) deleted and re-created within a second: exactly 4, all owned by the new one.
    _delete_tq(op)
    op.apply_tq(op.taskqueue())
    newest = op.get_tq()["metadata"]["uid"]

    def settled() -> bool:
        deployments = op.deployments()
        return len(deployments) == len(CLASSES) and all(
            [r.uid for r in d.metadata.owner_references or ()] == [newest]
            for d in deployments.values()
        )

    wait_for(settled, 30, "4 Deployments owned by the re-created TaskQueue")
    time.sleep(2 * POLL)
    assert settled()


def test_taskqueue_and_namespace_delete_with_the_operator_stopped(op: E2E) -> None:
    """K01 (a, b): nothing waits for an operator that is not running."""
    other = op.create_namespace(f"{op.ns}-b")
    op.secret(ns=other)
    op.apply_tq(op.taskqueue())
    op.apply_tq(op.taskqueue(), ns=other)
    op.wait_deployments()
    op.wait_deployments(ns=other)
    for ns in (op.ns, other):
        assert not op.get_tq(ns=ns)["metadata"].get("finalizers")
        for dep in op.deployments(ns=ns).values():
            assert not dep.metadata.finalizers

    op.restarts_operator = True
    assert op.operator.stop() == 0

    deleted = time.time()
    _delete_tq(op)
    wait_for(lambda: _gone(op.get_tq), 5, "the TaskQueue to go without an operator")
    wait_for(lambda: not _children(op), 30, "the garbage collector to remove its children")
    record_timing("tq_children_collected_operator_stopped", time.time() - deleted)

    deleted = time.time()
    op.core.delete_namespace(other)
    wait_for(lambda: _gone(lambda: op.core.read_namespace(other)), 60, f"namespace {other} to go")
    record_timing("namespace_deleted_operator_stopped", time.time() - deleted)


def test_deleting_a_taskqueue_collects_its_deployments_and_pods_delete_promptly(op: E2E) -> None:
    """K01 (c) and the garbage collection of a TaskQueue's Deployments."""
    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    op.enqueue(5, "normal")
    op.wait_scale("tq-normal", 1, POLL + 10)
    pod = wait_for(lambda: op.pods("tq-normal"), 30, "a worker pod")[0]

    op.core.delete_namespaced_pod(pod.metadata.name, op.ns)
    wait_for(
        lambda: _gone(lambda: op.core.read_namespaced_pod(pod.metadata.name, op.ns)),
        10,
        "the worker pod to be deleted",
    )
    deleted = time.time()
    _delete_tq(op)
    wait_for(lambda: _gone(op.get_tq), 10, "the TaskQueue to be deleted")
    wait_for(lambda: not _children(op), 30, "its Deployments and Service to be collected")
    record_timing("tq_children_collected", time.time() - deleted)
    wait_for(lambda: not op.pods("tq-normal"), 30, "its pods to be collected")
