"""What a TaskQueue turns into: the CRD's admission rules and the worker Deployments' spec.

Covers the issue's "applying the CRD and examples/taskqueue.yaml yields one Deployment per
class with the spec asked for", the schema's readable rejections, and B27(d)/K17 (grace period
versus drain).
"""

from __future__ import annotations

import threading
from typing import Any

import orjson
import pytest
import yaml
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import (
    CLASSES,
    E2E,
    GROUP,
    PLURAL,
    POLL,
    SECRET,
    VERSION,
    apply,
    wait_for,
)
from tests.support.workers import REPO_ROOT

pytestmark = pytest.mark.k8s_api

LAST_POLL = "conveyor_operator_last_poll_timestamp_seconds"
EXAMPLE = REPO_ROOT / "examples" / "taskqueue.yaml"
DRAIN_MARGIN = 30


def _example(op: E2E) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    secret = next(d for d in docs if d["kind"] == "Secret")
    tq = next(d for d in docs if d["kind"] == "TaskQueue")
    # The example's URL names the chart's in-cluster Redis; on this host that name resolves
    # nowhere, so only the URL is pointed at the test's Redis.
    secret["stringData"]["url"] = op.redis_url
    return secret, tq


def test_example_taskqueue_yields_one_deployment_per_class_with_the_spec_asked_for(
    op: E2E,
) -> None:
    secret, tq = _example(op)
    apply(op.api, secret, op.ns)
    apply(op.api, tq, op.ns)
    spec = tq["spec"]
    name = tq["metadata"]["name"]
    labels = {"namespace": op.ns, "taskqueue": name}

    deployments = op.wait_deployments(name)
    assert sorted(deployments) == sorted(f"{name}-{p}" for p in CLASSES)
    services = wait_for(
        lambda: op.core.list_namespaced_service(op.ns).items, 10, "the workers' Service"
    )
    assert [(s.metadata.name, s.spec.cluster_ip) for s in services] == [(f"{name}-workers", "None")]

    grace = spec["drain"]["graceSeconds"]
    for priority in CLASSES:
        dep = op.deployment_dict(f"{name}-{priority}")
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == spec["worker"]["image"]
        assert container["command"] == ["conveyor", "worker", *spec["worker"]["modules"]]
        env = {e["name"]: e for e in container["env"]}
        assert env["CONVEYOR_CLASSES"]["value"] == priority
        assert env["CONVEYOR_QUEUE"]["value"] == spec["queue"]
        assert env["CONVEYOR_GRACE"]["value"] == str(grace)
        concurrency = spec["classes"][priority].get("concurrency", 16)
        assert env["CONVEYOR_CONCURRENCY"]["value"] == str(concurrency)
        assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "url"}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert container["resources"] == spec["worker"]["resources"]
        assert pod["terminationGracePeriodSeconds"] == grace + DRAIN_MARGIN
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert dep["spec"]["replicas"] == spec["classes"][priority]["minReplicas"]

    # The queue's Redis gets the spec's default rate limit, and the TaskQueue reports itself
    # reachable and ready.
    wait_for(
        lambda: op.redis.hget(f"conveyor:{{{spec['queue']}}}:limits", "*") == b"50:1000",
        10,
        "the example's default rate limit in Redis",
    )
    wait_for(
        lambda: op.condition("Ready", name).get("status") == "True",
        10,
        "Ready=True on the example TaskQueue",
    )

    # No replicas drift: with nothing queued, two more polls (every 5 s) change nothing.
    before = {p: op.scale(f"{name}-{p}") for p in CLASSES}
    first = wait_for(lambda: op.operator.metric(LAST_POLL, **labels), 10, "a first poll")
    wait_for(
        lambda: (op.operator.metric(LAST_POLL, **labels) or 0) >= first + 9,
        20,
        "two more polls",
        every=0.5,
    )
    assert {p: op.scale(f"{name}-{p}") for p in CLASSES} == before
    assert op.op_audit(resource="deployments", subresource="scale") == []


@pytest.mark.parametrize(
    ("change", "code", "reason"),
    [
        pytest.param(
            {"classes": {"normal": {"minReplicas": 5, "maxReplicas": 2}}},
            422,
            "minReplicas must not exceed maxReplicas",
            id="min-above-max",
        ),
        pytest.param(
            {"worker": {"terminationGracePeriodSeconds": 30}, "drain": {"graceSeconds": 60}},
            422,
            "terminationGracePeriodSeconds must be at least drain.graceSeconds + 5",
            id="grace-shorter-than-drain",
        ),
        pytest.param(
            {"worker": {"imagePullPolicy": "Sometimes"}},
            422,
            'Unsupported value: "Sometimes"',
            id="bad-enum",
        ),
        pytest.param(
            {"classes": {"low": {"targetBacklogPerReplica": 0}}},
            422,
            "should be greater than or equal to 1",
            id="target-below-one",
        ),
        pytest.param(
            # K11(e): nothing in the spec can place workers in another namespace.
            {"worker": {"namespace": "kube-system"}},
            400,
            'unknown field "spec.worker.namespace"',
            id="workers-in-another-namespace",
        ),
    ],
)
def test_invalid_taskqueue_is_rejected_by_the_api_server_with_a_readable_reason(
    op: E2E, change: dict[str, Any], code: int, reason: str
) -> None:
    body = op.taskqueue("bad")
    _merge(body["spec"], change)

    with pytest.raises(ApiException) as rejected:
        # What `kubectl create` sends: strict field validation, so unknown fields are errors.
        op.custom.create_namespaced_custom_object(
            GROUP, VERSION, op.ns, PLURAL, body, field_validation="Strict"
        )
    assert rejected.value.status == code, rejected.value.body
    message = orjson.loads(rejected.value.body)["message"]
    assert reason in message
    with pytest.raises(ApiException) as missing:
        op.get_tq("bad")
    assert missing.value.status == 404


def _merge(into: dict[str, Any], change: dict[str, Any]) -> None:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _grace(op: E2E, deployment: str) -> int:
    return int(
        op.deployment_dict(deployment)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_grace_period_follows_the_drain_timeout_with_margin_and_rolls_out(op: E2E) -> None:
    """K17(a, b, d) and B27(d)."""
    body = op.taskqueue(drain={"graceSeconds": 300})
    op.apply_tq(body)
    dep = "tq-normal"
    op.wait_deployments()
    assert _grace(op, dep) >= 330
    generation = op.deployment_dict(dep)["metadata"]["generation"]

    body["spec"]["drain"] = {"graceSeconds": 600}
    op.apply_tq(body)
    wait_for(
        lambda: _grace(op, dep) >= 630,
        10,
        "the grace period to follow the new drain timeout",
    )
    assert op.deployment_dict(dep)["metadata"]["generation"] > generation, "no rollout"

    # (b) An explicit grace period shorter than the drain is refused at admission.
    short = op.taskqueue("short", drain={"graceSeconds": 300})
    short["spec"]["worker"]["terminationGracePeriodSeconds"] = 120
    with pytest.raises(ApiException) as rejected:
        op.apply_tq(short)
    assert rejected.value.status == 422
    assert "drain.graceSeconds" in orjson.loads(rejected.value.body)["message"]

    # (d) Deleting a worker pod gives it the Deployment's grace period.
    op.enqueue(5, "normal")
    op.wait_scale(dep, 1, POLL + 5)
    pod = wait_for(lambda: op.pods(dep), 20, "a normal pod")[0]
    seen: dict[str, Any] = {}
    ready = threading.Event()

    def watch_pod() -> None:
        stream = watch.Watch().stream(
            op.core.list_namespaced_pod,
            op.ns,
            field_selector=f"metadata.name={pod.metadata.name}",
            resource_version=pod.metadata.resource_version,
            timeout_seconds=15,
        )
        ready.set()
        for event in stream:
            meta = event["object"].metadata
            if meta.deletion_timestamp is not None:
                seen["grace"] = meta.deletion_grace_period_seconds
                return

    watcher = threading.Thread(target=watch_pod, daemon=True)
    watcher.start()
    ready.wait(5)
    op.core.delete_namespaced_pod(pod.metadata.name, op.ns)
    watcher.join(20)
    assert seen.get("grace") == 630
