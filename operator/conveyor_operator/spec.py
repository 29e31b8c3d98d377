"""The TaskQueue spec as typed values, with the CRD's defaults applied once more.

The API server already defaults and validates (crds/taskqueue.yaml); repeating the defaults
here keeps the operator correct against objects written before a default existed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from conveyor.keys import PRIORITY_CLASSES
from conveyor.schedule import Schedule
from conveyor_operator.autoscale import ScalingPolicy

GROUP = "conveyor.dev"
VERSION = "v1alpha1"
PLURAL = "taskqueues"
KIND = "TaskQueue"
DRAIN_MARGIN = 30
"""Seconds added to the drain grace for the pod's terminationGracePeriodSeconds: the worker
hands back unfinished jobs and exits after the drain, which must happen before SIGKILL."""


@dataclass(frozen=True)
class ClassSpec:
    priority: str
    policy: ScalingPolicy
    concurrency: int
    processes: int


@dataclass(frozen=True)
class TaskQueueSpec:
    queue: str
    paused: bool
    secret_name: str
    url_key: str
    password_key: str | None
    tls: bool
    image: str
    image_pull_policy: str
    modules: tuple[str, ...]
    command: tuple[str, ...]
    env: tuple[Mapping[str, Any], ...]
    resources: Mapping[str, Any]
    service_account: str | None
    grace_seconds: int
    termination_grace_seconds: int
    metrics_port: int
    poll_interval: float
    backoff_base: float
    backoff_cap: float
    classes: tuple[ClassSpec, ...]
    rate_limits: Mapping[str, Any]
    schedules: tuple[Mapping[str, Any], ...]

    def cls(self, priority: str) -> ClassSpec:
        return next(c for c in self.classes if c.priority == priority)


class InvalidSpec(ValueError):
    """A TaskQueue spec the operator cannot act on; the message names the offending field."""


_QUEUE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_KINDS: dict[type, str] = {
    Mapping: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
}


def _get(section: Mapping[str, Any], path: str, name: str, kind: type, default: Any) -> Any:
    """``section[name]`` checked against the CRD's type for it; ``default`` when absent.

    An object written before the CRD validated it (or with validation off) can hold anything:
    a wrong type must be an ``InvalidSpec`` naming the field, not an error deep in a reconcile.
    """
    value = section.get(name, default)
    if value is None and default is None:
        return None
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InvalidSpec(f"{path}{name} must be {_KINDS[kind]}, got {value!r:.60}")
    return value


def _strings(section: Mapping[str, Any], path: str, name: str) -> tuple[str, ...]:
    items = _get(section, path, name, list, [])
    if not all(isinstance(item, str) for item in items):
        raise InvalidSpec(f"{path}{name} must be a list of strings")
    return tuple(items)


def _objects(section: Mapping[str, Any], path: str, name: str) -> tuple[Mapping[str, Any], ...]:
    items = _get(section, path, name, list, [])
    if not all(isinstance(item, Mapping) for item in items):
        raise InvalidSpec(f"{path}{name} must be a list of objects")
    return tuple(items)


def _limit(value: Any, path: str) -> None:
    if not isinstance(value, Mapping):
        raise InvalidSpec(f"{path} must be an object")
    _get(value, path + ".", "count", int, None)
    _get(value, path + ".", "perSeconds", float, None)
    if "count" not in value or "perSeconds" not in value:
        raise InvalidSpec(f"{path} needs count and perSeconds")


def _check_rate_limits(limits: Mapping[str, Any]) -> None:
    if "default" in limits:
        _limit(limits["default"], "rateLimits.default")
    for group, limit in _get(limits, "rateLimits.", "groups", Mapping, {}).items():
        _limit(limit, f"rateLimits.groups[{group!r:.60}]")


def _check_schedules(schedules: tuple[Mapping[str, Any], ...]) -> None:
    for n, entry in enumerate(schedules):
        path = f"schedules[{n}]."
        for name in ("name", "cron", "jobType"):
            if name not in entry:
                raise InvalidSpec(f"{path}{name} is required")
            _get(entry, path, name, str, None)
        for name in ("timeZone", "priority", "catchUp"):
            _get(entry, path, name, str, "")
        _get(entry, path, "payload", Mapping, {})


def parse(spec: Mapping[str, Any]) -> TaskQueueSpec:
    """The typed spec, or ``InvalidSpec`` naming the first field that cannot be used."""
    if not isinstance(spec, Mapping):
        raise InvalidSpec(f"spec must be an object, got {spec!r:.60}")
    redis = _get(spec, "", "redis", Mapping, {})
    secret = _get(redis, "redis.", "secretRef", Mapping, {})
    worker = _get(spec, "", "worker", Mapping, {})
    scaling = _get(spec, "", "scaling", Mapping, {})
    drain = _get(spec, "", "drain", Mapping, {})
    grace = _get(drain, "drain.", "graceSeconds", int, 60)
    retry = _get(spec, "", "retry", Mapping, {})
    queue = _get(spec, "", "queue", str, "default")
    if not _QUEUE_NAME.fullmatch(queue):
        raise InvalidSpec(f"queue must match {_QUEUE_NAME.pattern}, got {queue!r:.60}")
    rate_limits = _get(spec, "", "rateLimits", Mapping, {})
    _check_rate_limits(rate_limits)
    schedules = _objects(spec, "", "schedules")
    _check_schedules(schedules)
    classes_spec = _get(spec, "", "classes", Mapping, {})

    def scaling_value(name: str, kind: type, default: Any) -> Any:
        return _get(scaling, "scaling.", name, kind, default)

    classes = []
    for priority in PRIORITY_CLASSES:
        raw = _get(classes_spec, "classes.", priority, Mapping, {})
        path = f"classes.{priority}."
        policy = ScalingPolicy(
            min_replicas=_get(raw, path, "minReplicas", int, 0),
            max_replicas=_get(raw, path, "maxReplicas", int, 10),
            target_backlog=_get(raw, path, "targetBacklogPerReplica", int, 10),
            activation_backlog=_get(raw, path, "activationBacklog", int, 0),
            tolerance=float(scaling_value("tolerance", float, 0.1)),
            scale_up_window=float(scaling_value("scaleUpStabilizationSeconds", float, 0)),
            scale_down_window=float(scaling_value("scaleDownStabilizationSeconds", float, 300)),
            max_step_up=scaling_value("maxScaleUpStep", int, 0),
            max_step_down=scaling_value("maxScaleDownStep", int, 0),
        )
        classes.append(
            ClassSpec(
                priority,
                policy,
                _get(raw, path, "concurrency", int, 16),
                _get(raw, path, "processes", int, 1),
            )
        )
    return TaskQueueSpec(
        queue=queue,
        paused=_get(spec, "", "paused", bool, False),
        secret_name=_get(secret, "redis.secretRef.", "name", str, ""),
        url_key=_get(secret, "redis.secretRef.", "urlKey", str, "url"),
        password_key=_get(secret, "redis.secretRef.", "passwordKey", str, None),
        tls=_get(redis, "redis.", "tls", bool, False),
        image=_get(worker, "worker.", "image", str, ""),
        image_pull_policy=_get(worker, "worker.", "imagePullPolicy", str, "IfNotPresent"),
        modules=_strings(worker, "worker.", "modules"),
        command=_strings(worker, "worker.", "command"),
        env=_objects(worker, "worker.", "env"),
        resources=_get(worker, "worker.", "resources", Mapping, {}),
        service_account=_get(worker, "worker.", "serviceAccountName", str, None),
        grace_seconds=grace,
        termination_grace_seconds=_get(
            worker, "worker.", "terminationGracePeriodSeconds", int, grace + DRAIN_MARGIN
        ),
        metrics_port=_get(worker, "worker.", "metricsPort", int, 9808),
        poll_interval=float(scaling_value("pollIntervalSeconds", float, 5)),
        backoff_base=float(_get(retry, "retry.", "backoffBaseSeconds", float, 1)),
        backoff_cap=float(_get(retry, "retry.", "backoffCapSeconds", float, 3600)),
        classes=tuple(classes),
        rate_limits=rate_limits,
        schedules=schedules,
    )


def _window_ms(seconds: float) -> int:
    # Exact: the schema sets no upper bound, and 1e305 s in float milliseconds is infinity.
    return round(Fraction(seconds) * 1000)


def rate_limits(spec: TaskQueueSpec) -> dict[str, str]:
    """The spec's rate limits in the ``limits`` hash format (``<count>:<window ms>``)."""
    out = {}
    default = spec.rate_limits.get("default")
    if default:
        out["*"] = f"{int(default['count'])}:{_window_ms(default['perSeconds'])}"
    for group, limit in (spec.rate_limits.get("groups") or {}).items():
        out[group] = f"{int(limit['count'])}:{_window_ms(limit['perSeconds'])}"
    return out


def schedules_of(spec: TaskQueueSpec) -> list[Schedule]:
    return [
        Schedule(
            name=s["name"],
            cron=s["cron"],
            job_type=s["jobType"],
            timezone=s.get("timeZone", "UTC"),
            payload=s.get("payload", {}),
            priority=s.get("priority", "normal"),
            catch_up=s.get("catchUp", "skip"),
        )
        for s in spec.schedules
    ]
