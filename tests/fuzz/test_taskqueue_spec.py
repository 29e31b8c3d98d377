"""The TaskQueue spec parser against arbitrary objects and against every object the CRD's
own schema (crds/taskqueue.yaml) accepts.

The API server validates a TaskQueue before the operator sees it, but an object stored before
a field was validated, or written with validation off, can hold anything. The parser must then
answer with ``InvalidSpec`` naming the field, never a ``KeyError``/``TypeError`` from deep in a
reconcile; and it must accept everything the schema accepts, or the two disagree about what a
TaskQueue is.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import assume, example, given
from hypothesis import strategies as st

from conveyor.errors import ConfigError
from conveyor.keys import PRIORITY_CLASSES
from conveyor_operator.spec import InvalidSpec, parse, rate_limits, schedules_of
from tests.fuzz.profiles import fuzz

CRD = Path(__file__).resolve().parents[2] / "crds" / "taskqueue.yaml"


def _plain_schema(node: Any) -> Any:
    """The CRD's schema as plain JSON Schema: Kubernetes's ``x-kubernetes-*`` extensions
    dropped (CEL rules are checked by ``_cel_rules_hold``; an object that preserves unknown
    fields is any object)."""
    if isinstance(node, dict):
        return {k: _plain_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [_plain_schema(v) for v in node]
    return node


def _spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return dict(_plain_schema(schema))


def _cel_rules_hold(spec: dict[str, Any]) -> bool:
    """The CRD's x-kubernetes-validations, with the defaults the API server would apply."""
    for priority in PRIORITY_CLASSES:
        cls = spec.get("classes", {}).get(priority, {})
        if cls.get("minReplicas", 0) > cls.get("maxReplicas", 10):
            return False
    grace = spec.get("drain", {}).get("graceSeconds", 60)
    termination = spec["worker"].get("terminationGracePeriodSeconds")
    return termination is None or termination >= grace + 5


def _use(spec: Any) -> None:
    """Everything the operator derives from a spec; raises only the errors it handles."""
    parsed = parse(spec)
    rate_limits(parsed)
    # A cron or time zone the scheduler refuses is reported as an event by the scaler.
    with contextlib.suppress(ConfigError):
        schedules_of(parsed)
    parsed.cls("normal")


_FIELDS = [
    "queue", "paused", "redis", "secretRef", "name", "urlKey", "passwordKey", "tls", "worker",
    "image", "imagePullPolicy", "modules", "command", "env", "resources", "serviceAccountName",
    "terminationGracePeriodSeconds", "metricsPort", "classes", *PRIORITY_CLASSES, "minReplicas",
    "maxReplicas", "targetBacklogPerReplica", "activationBacklog", "concurrency", "processes",
    "scaling", "pollIntervalSeconds", "tolerance", "drain", "graceSeconds", "retry",
    "backoffBaseSeconds", "backoffCapSeconds", "rateLimits", "default", "groups", "count",
    "perSeconds", "schedules", "cron", "jobType", "timeZone", "payload", "priority", "catchUp",
]  # fmt: skip
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
_objects = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)


@fuzz(scale=3.0)
@given(spec=_objects)
@example(spec={"redis": []})  # AttributeError: 'list' object has no attribute 'get'
@example(spec={"classes": {"normal": {"minReplicas": "two"}}})  # ValueError from int()
@example(spec={"rateLimits": {"default": {"count": 1}}})  # KeyError in rate_limits()
@example(spec={"schedules": [{"name": "x"}]})  # KeyError in schedules_of()
@example(spec={"queue": "no spaces"})  # ValueError from Keyspace, later, in the scaler
@example(spec=None)
def test_any_object_is_parsed_or_refused_with_invalid_spec(spec: Any) -> None:
    refusal = None
    try:
        _use(spec)
    except InvalidSpec as exc:
        refusal = str(exc)
    assert refusal is None or refusal.strip(), "an InvalidSpec that names nothing"


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under ``schema``, for the part of JSON Schema the CRD uses.

    hypothesis-jsonschema would do this, but 0.23.1 (the latest) fails on the Hypothesis this
    project pins (``AttributeError: 'many' object has no attribute 'more'``).
    """
    kind = schema.get("type")
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        if not properties:
            values = (
                from_schema(schema["additionalProperties"])
                if ("additionalProperties" in schema)
                else _scalars
            )
            return st.dictionaries(st.text(max_size=8), values, max_size=3)
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in properties.items() if k in required},
            optional={k: from_schema(v) for k, v in properties.items() if k not in required},
        )
    if kind == "array":
        return st.lists(
            from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0), max_size=3
        )
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=20)
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        floats = st.floats(low, high, allow_nan=False, allow_infinity=False)
        if kind == "integer":
            return st.integers(low, high)
        # A JSON number may be written as an integer: both are valid ``number``s.
        whole = st.integers(
            None if low is None else math.ceil(low), None if high is None else math.floor(high)
        )
        return whole | floats
    if kind == "boolean":
        return st.booleans()
    return _scalars


@fuzz(scale=1.0)
@given(spec=from_schema(_spec_schema()))
@example(  # OverflowError in rate_limits(): a window of 1.8e305 s is infinite in float ms
    spec={
        "redis": {"secretRef": {"name": "r"}},
        "worker": {"image": "i", "modules": ["m"]},
        "rateLimits": {"default": {"count": 1, "perSeconds": 1.797693134862316e305}},
    }
)
def test_every_spec_the_crd_accepts_is_accepted_by_the_parser(spec: dict[str, Any]) -> None:
    assume(_cel_rules_hold(spec))
    _use(spec)
