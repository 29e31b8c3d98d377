"""Every field the operator writes into ``.status`` is declared by the CRD (K09), and the chart
ships the same CRD as ``crds/``.

The API server prunes undeclared fields of a structural schema without an error, so a status
field added to the operator but not to the CRD would vanish silently. The statuses checked here
are the ones the operator's own scaler writes: ``Scaler.poll`` runs against an in-memory stand-in
for the Kubernetes API and the Redis reader (no cluster: this is the ``unit`` half of K09; the
``k8s-api`` half is tests/e2e/test_operator_status.py), through a scale-up, a steady poll, a
foreign autoscaler, an unreachable Redis and a missing Secret.
"""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from conveyor.keys import PRIORITY_CLASSES
from conveyor.queue import ClassStats
from conveyor_operator.backlog import BacklogUnavailable
from conveyor_operator.manifests import deployment_name
from conveyor_operator.scaler import Known, Scaler
from conveyor_operator.spec import parse

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "taskqueue.yaml"
CHART_CRD = REPO / "charts" / "conveyor" / "crds" / "taskqueue.yaml"
EXAMPLE = REPO / "examples" / "taskqueue.yaml"
_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def status_schema() -> dict[str, Any]:
    (crd,) = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert version["subresources"].get("status") == {}, "status must be a subresource (K09)"
    return dict(version["schema"]["openAPIV3Schema"]["properties"]["status"])


def violations(value: Any, schema: dict[str, Any], path: str = "status") -> list[str]:
    """What a structural schema would prune (undeclared fields) or reject (wrong types)."""
    kind = schema.get("type")
    if kind is not None:
        allowed = _TYPES[kind]
        if isinstance(value, bool) and bool not in allowed:
            return [f"{path}: {value!r} is not {kind}"]
        if not isinstance(value, allowed):
            return [f"{path}: {value!r} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not in {schema['enum']}"]
    if schema.get("format") == "date-time":
        try:
            datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return [f"{path}: {value!r} is not a date-time"]
    found = []
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        declared = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key in schema.get("required", ()):
            if key not in value:
                found.append(f"{path}.{key}: required but missing")
        for key, item in value.items():
            if key in declared:
                found += violations(item, declared[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += violations(item, extra, f"{path}.{key}")
            else:
                found.append(f"{path}.{key}: not declared in the CRD, would be pruned")
    if isinstance(value, list):
        for i, item in enumerate(value):
            found += violations(item, schema.get("items", {}), f"{path}[{i}]")
    return found


class FakeKube:
    """The calls Scaler.poll makes to Kubernetes, answered from memory."""

    def __init__(self, deployments: dict[str, Any]) -> None:
        self._deployments = deployments
        self.secret: dict[str, bytes] | None = {"url": b"redis://127.0.0.1:1/0"}
        self.foreign: dict[str, str] = {}
        self.statuses: list[dict[str, Any]] = []
        self.scaled: list[tuple[str, int]] = []

    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.secret

    def deployments(self, namespace: str, taskqueue: str) -> dict[str, Any]:
        return self._deployments

    def autoscalers(self, namespace: str) -> dict[str, str]:
        return self.foreign

    def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        self.scaled.append((deployment, replicas))

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        # What goes over the wire: JSON, so tuples or datetimes would show up as wrong types.
        self.statuses.append(copy.deepcopy(status))

    def event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def end_series(self, namespace: str, name: str, reason: str) -> None:
        pass


class FakeReader:
    def __init__(self) -> None:
        self.stats: dict[str, ClassStats] = {}
        self.failure: BacklogUnavailable | None = None
        self.counter = 0

    async def read(self, target: Any) -> dict[str, ClassStats]:
        if self.failure is not None:
            raise self.failure
        return self.stats

    async def started(self, target: Any) -> dict[str, int]:
        self.counter += 1
        return dict.fromkeys(PRIORITY_CLASSES, self.counter)

    def client(self, target: Any) -> Any:
        return None


def _row(priority: str, ready: int) -> ClassStats:
    return ClassStats(
        priority=priority,
        ready=ready,
        due_delayed=1,
        future_delayed=2,
        in_flight=3,
        dead=4,
        oldest_ready_age=1.5,
        limited_groups=0,
    )


def _taskqueue() -> dict[str, Any]:
    (body,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d["kind"] == "TaskQueue"]
    # Rate limits and schedules are applied in Redis and leave no trace in status.
    body["spec"].pop("rateLimits", None)
    body["spec"].pop("schedules", None)
    body["metadata"].update(namespace="team-a", uid="u-1", generation=3)
    return dict(body)


def _statuses() -> list[dict[str, Any]]:
    body = _taskqueue()
    deps = {
        deployment_name("tq", p): SimpleNamespace(
            metadata=SimpleNamespace(name=deployment_name("tq", p)),
            spec=SimpleNamespace(replicas=1),
            status=SimpleNamespace(ready_replicas=1),
        )
        for p in PRIORITY_CLASSES
    }
    kube = FakeKube(deps)
    reader = FakeReader()
    scaler = Scaler(kube, "op-unit")  # type: ignore[arg-type]
    scaler.reader = reader  # type: ignore[assignment]
    entry = Known(body, parse(body["spec"]))

    async def run() -> None:
        reader.stats = {p: _row(p, 900) for p in PRIORITY_CLASSES}
        await scaler.poll(entry)  # every class scales up: lastScaleTime and reason
        await scaler.poll(entry)  # steady
        kube.foreign = {deployment_name("tq", "high"): "HorizontalPodAutoscaler/other"}
        await scaler.poll(entry)  # Scaling=False, ConflictingAutoscaler
        reader.failure = BacklogUnavailable("ConnectionRefused", "Redis refused the connection")
        await scaler.poll(entry)
        kube.secret = None
        await scaler.poll(entry)

    asyncio.run(run())
    assert kube.scaled, "the scenario should have scaled up"
    return kube.statuses


def test_every_status_field_the_operator_writes_is_declared_in_the_crd() -> None:
    statuses = _statuses()
    assert len(statuses) >= 4
    schema = status_schema()
    problems = sorted({p for status in statuses for p in violations(status, schema)})
    assert problems == []
    # The scenario reached the fields that only some polls write.
    first = statuses[0]
    assert {"lastScaleTime", "lastScaleReason", "desiredReplicas"} <= set(
        first["classes"]["normal"]
    )
    reasons = {c["reason"] for s in statuses for c in s["conditions"]}
    assert {"ConflictingAutoscaler", "ConnectionRefused", "SecretNotFound"} <= reasons


@pytest.mark.parametrize(
    "status",
    [
        {"classes": {"normal": {"ready": 1, "undeclared": 2}}},
        {"conditions": [{"type": "Ready", "status": "Maybe"}]},
        {"replicas": "3"},
        {"extra": True},
    ],
)
def test_the_check_itself_catches_what_the_api_server_would_drop(status: dict[str, Any]) -> None:
    assert violations(status, status_schema())


def test_the_charts_crd_is_the_same_file_as_crds() -> None:
    assert CHART_CRD.read_bytes() == CRD.read_bytes()
