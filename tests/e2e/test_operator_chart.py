"""The Helm chart on the control plane, and the RBAC it grants the operator (K12).

The session's operator already runs with the chart's rendered RBAC; here the chart itself is
linted and installed, its permissions are compared with a golden list, and one scenario in
two namespaces (neither the operator's own) checks that every granted permission is used and
none is missing: zero 403s for the operator's user.
"""

from __future__ import annotations

import time
from typing import Any

import kubernetes.client as k8s
import pytest
import yaml

from conveyor.local import free_port
from tests.e2e.conftest import (
    CHART,
    CLASSES,
    E2E,
    GROUP,
    OPERATOR_SA,
    OPERATOR_USER,
    PLURAL,
    POLL,
    VERSION,
    helm,
    replicas_manager,
    wait_for,
)

pytestmark = pytest.mark.k8s_api

GOLDEN: dict[tuple[str, str], set[str]] = {
    ("conveyor.dev", "taskqueues"): {"get", "list", "watch", "patch"},
    ("conveyor.dev", "taskqueues/status"): {"patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
    ("apps", "deployments/scale"): {"patch"},
    ("", "services"): {"get", "create"},
    ("", "pods"): {"list", "patch"},
    ("", "secrets"): {"get"},
    ("", "namespaces"): {"get"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("autoscaling", "horizontalpodautoscalers"): {"list"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
}
"""Every permission the chart grants the operator: (API group, resource) → verbs."""


def _rules(docs: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_helm_lint_is_clean(op: E2E) -> None:
    linted = helm(op.cluster, "lint", "--strict", str(CHART))
    assert "[WARNING]" not in linted.stdout
    assert "[ERROR]" not in linted.stdout
    assert "0 chart(s) failed" in linted.stdout


def test_helm_install_into_the_control_plane_creates_the_charts_objects(op: E2E) -> None:
    release = f"r{op.ns[-8:]}"
    installed = helm(
        op.cluster,
        "install",
        release,
        str(CHART),
        "--namespace",
        op.ns,
        "--set",
        "redis.enabled=true",
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    op.on_teardown(lambda: helm(op.cluster, "uninstall", release, "--namespace", op.ns))
    status = helm(op.cluster, "status", release, "--namespace", op.ns, "-o", "json")
    assert yaml.safe_load(status.stdout)["info"]["status"] == "deployed"

    name = f"{release}-operator"
    deployment = op.apps.read_namespaced_deployment(name, op.ns)
    assert deployment.spec.template.spec.service_account_name == name
    (container,) = deployment.spec.template.spec.containers
    assert container.security_context.read_only_root_filesystem is True
    op.core.read_namespaced_service_account(name, op.ns)
    op.apps.read_namespaced_stateful_set(f"{release}-redis", op.ns)
    rbac = k8s.RbacAuthorizationV1Api(op.api)
    role = rbac.read_cluster_role(name)
    rbac.read_cluster_role_binding(name)
    rbac.read_namespaced_role(f"{name}-lease", op.ns)
    rbac.read_namespaced_role_binding(f"{name}-lease", op.ns)
    # The installed ClusterRole is the one the session's operator runs with.
    installed_rules = _rules(
        [{"kind": "ClusterRole", "rules": op.api.sanitize_for_serialization(role)["rules"]}]
    )
    session_rules = _rules([d for d in op.plane.rbac if d["kind"] == "ClusterRole"])
    assert installed_rules == session_rules
    # kwok runs the operator's pods as far as a fake node can: scheduled and Running.
    wait_for(
        lambda: (
            len(
                [
                    p
                    for p in op.core.list_namespaced_pod(
                        op.ns, label_selector="app.kubernetes.io/component=operator"
                    ).items
                    if p.status.phase == "Running"
                ]
            )
            == 2
        ),
        30,
        "the chart's two operator pods Running",
    )

    # The chart's example TaskQueue passes the API server's validation as rendered.
    rendered = helm(
        op.cluster, "template", release, str(CHART), "--set", "exampleTaskQueue.enabled=true"
    )
    (example,) = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "TaskQueue"]
    op.custom.create_namespaced_custom_object(
        GROUP, VERSION, op.ns, PLURAL, example, dry_run="All", field_validation="Strict"
    )

    uninstalled = helm(op.cluster, "uninstall", release, "--namespace", op.ns)
    assert uninstalled.returncode == 0
    wait_for(
        lambda: not [r for r in rbac.list_cluster_role().items if r.metadata.name == name],
        30,
        "the ClusterRole removed by helm uninstall",
    )


def test_operator_uses_every_permission_the_chart_grants_and_is_never_forbidden(op: E2E) -> None:
    """K12 (a, c); zero 403s is asserted by the ``op`` fixture for every test."""
    granted = _rules(op.plane.rbac)
    assert granted == GOLDEN
    for (group, resource), verbs in granted.items():
        assert "*" not in verbs
        assert "*" not in resource
        assert "*" not in group
    assert granted[("", "secrets")] == {"get"}, "no listing or watching of Secrets"

    team_a, team_b = op.ns, op.create_namespace(f"{op.ns}-b")
    # team-a scales up, then down with deletion costs, and has a Deployment deleted and edited.
    op.apply_tq(
        op.taskqueue(
            classes={"normal": {"targetBacklogPerReplica": 1}},
            scaling={"scaleDownStabilizationSeconds": 2},
        )
    )
    op.wait_deployments()
    op.enqueue(1, "normal", payload={"seconds": 60})
    op.enqueue(2, "normal", payload={"seconds": 0.2})
    op.wait_scale("tq-normal", 3, POLL + 10)
    wait_for(lambda: len(op.pods("tq-normal")) == 3, 30, "three pods")
    op.workers("normal", concurrency=3)
    op.wait_scale("tq-normal", 1, 2 + 2 * POLL + 15)
    op.apps.delete_namespaced_deployment("tq-low", op.ns)
    wait_for(lambda: "tq-low" in op.deployments(), 10, "tq-low re-created")
    op.apps.patch_namespaced_deployment(
        "tq-high",
        op.ns,
        {"spec": {"template": {"spec": {"containers": [{"name": "worker", "image": "x:1"}]}}}},
    )
    # team-b's Redis refuses connections for several polls: one Warning, aggregated.
    op.secret(f"redis://127.0.0.1:{free_port()}/0", ns=team_b)
    op.apply_tq(op.taskqueue(), ns=team_b)
    op.wait_deployments(ns=team_b)
    warning = wait_for(
        lambda: [e for e in op.events("RedisUnreachable", ns=team_b) if e.count >= 3],
        10 * POLL,
        "a repeated Warning in team-b",
    )
    assert len(warning) == 1
    assert op.events("Scaled", ns=team_a)
    wait_for(
        lambda: (
            op.apps.read_namespaced_deployment("tq-high", op.ns)
            .spec.template.spec.containers[0]
            .image
            != "x:1"
        ),
        POLL + 5,
        "the image restored",
    )
    op.custom.delete_namespaced_custom_object(GROUP, VERSION, team_a, PLURAL, "tq")
    time.sleep(POLL)

    # Every granted permission was used by the operator in this session, successfully.
    used: set[tuple[str, str, str]] = set()
    for entry in op.cluster.audit(user=OPERATOR_USER, stage=None):
        if entry.code is not None and entry.code >= 400 and entry.code != 404:
            continue
        resource = entry.resource or ""
        if entry.subresource:
            resource += f"/{entry.subresource}"
        used.add((entry.api_group, resource, entry.verb))
    unused = sorted(
        (group, resource, verb)
        for (group, resource), verbs in GOLDEN.items()
        for verb in verbs
        if (group, resource, verb) not in used
    )
    assert unused == [], f"granted but never used: {unused}"


def test_scale_down_without_the_right_to_annotate_pods_warns_and_recovers_without_restart(
    op: E2E,
) -> None:
    """K12 (b): ``patch`` on pods revoked, then restored, while the operator keeps running."""
    op.forbidden_on_purpose.add(("patch", "pods"))
    rbac = k8s.RbacAuthorizationV1Api(op.api)
    role = rbac.read_cluster_role(OPERATOR_SA)
    granted = op.api.sanitize_for_serialization(role)["rules"]
    revoked = [
        {**r, "verbs": [v for v in r["verbs"] if v != "patch"]} if r["resources"] == ["pods"] else r
        for r in granted
    ]
    op.on_teardown(lambda: rbac.patch_cluster_role(OPERATOR_SA, {"rules": granted}))
    rbac.patch_cluster_role(OPERATOR_SA, {"rules": revoked})

    op.apply_tq(
        op.taskqueue(
            classes={"normal": {"targetBacklogPerReplica": 1}},
            scaling={"scaleDownStabilizationSeconds": 2},
        )
    )
    op.wait_deployments()
    op.workers("normal", concurrency=3)
    op.enqueue(1, "normal", payload={"seconds": 120})

    def scale_down_from_three() -> float:
        op.enqueue(2, "normal", payload={"seconds": 1.5})
        op.wait_scale("tq-normal", 3, POLL + 10)
        wait_for(lambda: len(op.pods("tq-normal")) == 3, 30, "three pods")
        op.wait_scale("tq-normal", 1, 1.5 + 2 + 2 * POLL + 15)
        return time.time()

    scale_down_from_three()
    wait_for(
        lambda: op.condition("Scaling").get("reason") == "DeletionCostForbidden",
        2 * POLL + 5,
        "Scaling condition naming the missing right",
    )
    (event,) = op.events("DeletionCostForbidden")
    assert event.type == "Warning"
    assert op.operator.probe("/healthz") == 200

    rbac.patch_cluster_role(OPERATOR_SA, {"rules": granted})
    restored = time.time()
    done = scale_down_from_three()
    assert done - restored < 60
    annotated = [
        e for e in op.op_audit(since=restored, verb="patch", resource="pods") if e.code == 200
    ]
    assert annotated, "no deletion costs after the right came back"
    wait_for(
        lambda: op.condition("Scaling").get("reason") == "Active",
        2 * POLL + 5,
        "the Scaling condition to recover",
    )


def test_helm_upgrade_with_changed_values_leaves_worker_replicas_to_the_operator(op: E2E) -> None:
    """K07 (d), the Helm half: the chart never renders worker Deployments, so an upgrade that
    changes the example TaskQueue's worker image rolls the workers out through the operator
    without any write to ``spec.replicas``; an upgrade changing nothing writes nothing."""
    release = f"u{op.ns[-8:]}"
    tq = f"{release}-example"
    values = [
        "--namespace",
        op.ns,
        "--set",
        "exampleTaskQueue.enabled=true",
        "--set",
        f"exampleTaskQueue.redisUrl={op.redis_url}",
        "--set",
        f"exampleTaskQueue.queue={op.queue}",
    ]
    installed = helm(op.cluster, "install", release, str(CHART), *values, check=False)
    assert installed.returncode == 0, installed.stderr
    op.on_teardown(lambda: helm(op.cluster, "uninstall", release, "--namespace", op.ns))
    op.wait_deployments(tq)
    poll = float(op.get_tq(tq)["spec"]["scaling"]["pollIntervalSeconds"])
    op.enqueue(30, "normal")
    op.wait_scale(f"{tq}-normal", 3, poll + 10)
    wait_for(lambda: op.status(tq).get("classes"), 2 * poll + 5, "a first status")

    names = {p: f"{tq}-{p}" for p in CLASSES}
    before = {p: op.scale(name) for p, name in names.items()}
    assert before == {"critical": 1, "high": 0, "normal": 3, "low": 0}
    managers = {p: replicas_manager(op.deployment_dict(name)) for p, name in names.items()}
    histories = {p: op.history(name) for p, name in names.items()}
    upgraded_at = time.time()
    new_image = "ghcr.io/example/conveyor-worker:0.2.0"
    upgraded = helm(
        op.cluster,
        "upgrade",
        release,
        str(CHART),
        *values,
        "--set",
        f"exampleTaskQueue.workerImage={new_image}",
        "--set",
        "operator.replicas=1",
        check=False,
    )
    assert upgraded.returncode == 0, upgraded.stderr
    wait_for(
        lambda: all(
            op.apps.read_namespaced_deployment(name, op.ns).spec.template.spec.containers[0].image
            == new_image
            for name in names.values()
        ),
        poll + 10,
        "the new worker image in every worker Deployment",
    )
    # The same values again: nothing to change.
    again = helm(
        op.cluster,
        "upgrade",
        release,
        str(CHART),
        *values,
        "--set",
        f"exampleTaskQueue.workerImage={new_image}",
        "--set",
        "operator.replicas=1",
        check=False,
    )
    assert again.returncode == 0, again.stderr
    time.sleep(3 * poll)

    for p, name in names.items():
        assert {r for _, r, _, _ in histories[p].entries} == {before[p]}, (p, histories[p].entries)
        assert {m for _, _, _, m in histories[p].entries} == {managers[p]}, p
        assert op.scale(name) == before[p]
    writes = [
        e
        for e in op.cluster.audit(resource="deployments", since=upgraded_at, namespace=op.ns)
        if e.name in names.values()
        and e.verb in ("create", "update", "patch")
        # The deployment controller's status updates during the rollout are no fight.
        and (e.subresource == "scale" or (not e.subresource and e.user != OPERATOR_USER))
    ]
    assert writes == [], [(e.user, e.verb, e.name, e.subresource) for e in writes]
    # The upgrade replaced the TaskQueue's spec, not its status.
    assert op.status(tq).get("classes")
