"""Drift and fights over ``spec.replicas``: hand edits are repaired, other writers are not fought.

A hand-deleted Deployment comes back, a hand-changed image is restored, a ``kubectl scale`` is
undone once with an Event (K07 a), a foreign HPA makes the operator stand back (K07 b), a spec
change rolls out without touching replicas (K07 c, d), and replica writes survive a storm of
full updates of the same Deployment (K08).
"""

from __future__ import annotations

import threading
import time

import kubernetes.client as k8s
import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import E2E, GROUP, PLURAL, POLL, VERSION, record_timing, wait_for

pytestmark = pytest.mark.k8s_api

MARGIN = 1.5
SETTLE = 1.0
"""The operator's wait between pod deletion-cost annotations and a scale-down."""


def _at(op: E2E, replicas: int, priority: str = "normal") -> None:
    op.apply_tq(op.taskqueue())
    op.wait_deployments()
    op.enqueue(replicas * 10, priority)
    op.wait_scale(f"tq-{priority}", replicas, POLL + 10)


def test_hand_deleted_deployment_comes_back_with_its_replicas(op: E2E) -> None:
    _at(op, 2)
    old = op.apps.read_namespaced_deployment("tq-normal", op.ns).metadata.uid
    deleted = time.time()
    op.apps.delete_namespaced_deployment("tq-normal", op.ns)

    def recreated() -> k8s.V1Deployment | None:
        try:
            dep = op.apps.read_namespaced_deployment("tq-normal", op.ns)
        except ApiException:
            return None
        return dep if dep.metadata.uid != old else None

    dep = wait_for(recreated, 10, "tq-normal to be re-created", every=0.05)
    record_timing("hand_deleted_deployment_recreated", time.time() - deleted)
    assert dep.spec.replicas == 2
    (owner,) = dep.metadata.owner_references
    assert owner.uid == op.get_tq()["metadata"]["uid"]
    wait_for(lambda: op.events("DriftRepaired"), 10, "a DriftRepaired Event")


def test_hand_changed_image_is_restored_with_an_event(op: E2E) -> None:
    _at(op, 1)
    wanted = op.get_tq()["spec"]["worker"]["image"]
    history = op.history("tq-normal")
    op.apps.patch_namespaced_deployment(
        "tq-normal",
        op.ns,
        {"spec": {"template": {"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}}}},
    )
    changed = time.time()

    def image() -> str:
        return str(
            op.apps.read_namespaced_deployment("tq-normal", op.ns)
            .spec.template.spec.containers[0]
            .image
        )

    wait_for(lambda: image() == wanted, POLL + MARGIN, "the image to be restored", every=0.05)
    record_timing("hand_changed_image_restored", time.time() - changed)
    (event,) = wait_for(lambda: op.events("DriftRepaired"), 10, "a DriftRepaired Event")
    assert "image" in event.note
    assert history.replicas() == [1]


def test_manual_scale_is_reverted_within_one_poll_with_one_event(op: E2E) -> None:
    """K07 (a)."""
    _at(op, 3)
    history = op.history("tq-normal")
    # What `kubectl scale deploy tq-normal --replicas=9` sends.
    op.apps.patch_namespaced_deployment_scale("tq-normal", op.ns, {"spec": {"replicas": 9}})
    scaled = time.time()
    op.wait_scale("tq-normal", 3, POLL + SETTLE + 10)
    back = history.wait_first(lambda r: r == 3, after=scaled)
    record_timing("manual_scale_reverted", back - scaled)
    assert back - scaled <= POLL + SETTLE + MARGIN

    (event,) = wait_for(lambda: op.events("ExternalScale"), 10, "an ExternalScale Event")
    assert "9" in event.note
    time.sleep(4 * POLL)
    assert len(op.scale_writes("tq-normal", since=scaled)) == 1
    assert history.replicas() == [3, 9, 3]


def test_foreign_autoscaler_makes_the_operator_stop_writing_that_class(op: E2E) -> None:
    """K07 (b): a real HPA (the controller manager enforces minReplicas without metrics)."""
    _at(op, 3)
    history = op.history("tq-normal")
    hpa = k8s.V2HorizontalPodAutoscaler(
        metadata=k8s.V1ObjectMeta(name="rival"),
        spec=k8s.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=k8s.V2CrossVersionObjectReference(
                api_version="apps/v1", kind="Deployment", name="tq-normal"
            ),
            min_replicas=5,
            max_replicas=10,
        ),
    )
    created = time.time()
    k8s.AutoscalingV2Api(op.api).create_namespaced_horizontal_pod_autoscaler(op.ns, hpa)

    def conflict() -> dict[str, str] | None:
        found = op.condition("Scaling")
        return found if found.get("reason") == "ConflictingAutoscaler" else None

    condition = wait_for(conflict, 2 * POLL + MARGIN, "Scaling=False ConflictingAutoscaler")
    assert condition["status"] == "False"
    assert "rival" in condition["message"]
    (event,) = wait_for(lambda: op.events("ConflictingAutoscaler"), 10, "a Warning Event")
    assert event.type == "Warning"

    op.wait_scale("tq-normal", 5, 30)
    time.sleep(5 * POLL)
    assert op.scale("tq-normal") == 5
    assert op.scale_writes("tq-normal", since=created) == []
    assert history.replicas() == [3, 5]

    # Once the HPA is gone the class is the operator's again.
    k8s.AutoscalingV2Api(op.api).delete_namespaced_horizontal_pod_autoscaler("rival", op.ns)
    wait_for(
        lambda: op.condition("Scaling").get("status") == "True", 2 * POLL + MARGIN, "Scaling=True"
    )
    op.wait_scale("tq-normal", 3, POLL + SETTLE + 10)


def test_spec_change_rolls_out_without_touching_replicas(op: E2E) -> None:
    """K07 (c, d)."""
    _at(op, 7)
    history = op.history("tq-normal")
    body = op.taskqueue()
    body["spec"]["worker"]["image"] = "registry.example/conveyor-worker:e2e-2"
    op.apply_tq(body)
    # The rollout patches the four classes one after another; wait for all of them, so that
    # the writes counted below can only come from applying the same TaskQueue again.
    wait_for(
        lambda: all(
            op.apps.read_namespaced_deployment(f"tq-{c}", op.ns)
            .spec.template.spec.containers[0]
            .image.endswith("e2e-2")
            for c in ("critical", "high", "normal", "low")
        ),
        POLL + MARGIN,
        "the new image in every worker Deployment",
    )
    # (d) The same TaskQueue applied again changes nothing.
    reapplied = time.time()
    op.apply_tq(body)
    time.sleep(3 * POLL)

    assert {r for _, r, _, _ in history.entries} == {7}
    managers = {m for _, _, _, m in history.entries}
    assert managers == {"conveyor-operator/scale"}, managers
    writes = [
        e
        for e in op.op_audit(since=reapplied, resource="deployments")
        if e.verb in ("create", "update", "patch")
    ]
    assert writes == []


def test_replica_patches_survive_concurrent_full_updates_of_the_deployment(op: E2E) -> None:
    """K08: a test client PUTs the whole Deployment 20 times a second meanwhile."""
    _at(op, 2)
    history = op.history("tq-normal")
    stop = threading.Event()
    state = {"seq": 0, "labels": 0, "conflicts": 0}

    def put_loop() -> None:
        with op.cluster.api_client() as api:
            apps = k8s.AppsV1Api(api)
            while not stop.is_set():
                began = time.monotonic()
                dep = apps.read_namespaced_deployment("tq-normal", op.ns)
                dep.metadata.annotations = {
                    **(dep.metadata.annotations or {}),
                    "test/seq": str(state["seq"] + 1),
                }
                try:
                    apps.replace_namespaced_deployment("tq-normal", op.ns, dep)
                    state["seq"] += 1
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    state["conflicts"] += 1
                time.sleep(max(0.0, 0.05 - (time.monotonic() - began)))

    def label_loop() -> None:
        with op.cluster.api_client() as api:
            custom = k8s.CustomObjectsApi(api)
            while not stop.wait(0.2):
                state["labels"] += 1
                custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    op.ns,
                    PLURAL,
                    "tq",
                    {"metadata": {"labels": {"test/label-seq": str(state["labels"])}}},
                )

    threads = [threading.Thread(target=put_loop), threading.Thread(target=label_loop)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        grown = op.enqueue(60, "normal")
        op.wait_scale("tq-normal", 8, 2 * POLL + 10)
        up = history.wait_first(lambda r: r == 8)
        record_timing("scale_up_2_to_8_under_put_storm", up - grown)
        assert up - grown <= 2 * POLL + MARGIN
        # Keep the storm up until it has really stormed, however loaded the machine is.
        wait_for(lambda: state["seq"] >= 40, 30, "40 full updates of the Deployment")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)

    dep = op.apps.read_namespaced_deployment("tq-normal", op.ns)
    assert dep.metadata.annotations["test/seq"] == str(state["seq"])
    assert op.get_tq()["metadata"]["labels"]["test/label-seq"] == str(state["labels"])
    assert dep.spec.replicas == 8
    # Every 409 the operator met was followed by a successful write within 5 s.
    for conflict in op.op_audit(code=409):
        followed = [
            e
            for e in op.op_audit(since=conflict.received.timestamp(), resource=conflict.resource)
            if e.verb == conflict.verb
            and e.code
            and e.code < 300
            and (e.received - conflict.received).total_seconds() <= 5
        ]
        assert followed, f"409 on {conflict.verb} {conflict.resource} never retried"
    status = wait_for(
        lambda: (c := op.status().get("classes", {}).get("normal")) and c["backlog"] == 80 and c,
        2 * POLL + MARGIN,
        "status with the latest backlog",
    )
    assert status["desiredReplicas"] == 8

    # Then a hand-changed image: restored, and scaling goes on.
    op.apps.patch_namespaced_deployment(
        "tq-normal",
        op.ns,
        {"spec": {"template": {"spec": {"containers": [{"name": "worker", "image": "evil:2"}]}}}},
    )
    wait_for(
        lambda: (
            op.apps.read_namespaced_deployment("tq-normal", op.ns)
            .spec.template.spec.containers[0]
            .image
            != "evil:2"
        ),
        POLL + MARGIN,
        "the image to be restored",
    )
    op.enqueue(20, "normal")
    op.wait_scale("tq-normal", 10, POLL + 10)
