"""The TaskQueue spec as typed values, with the CRD's defaults applied once more.

The API server already defaults and validates (crds/taskqueue.yaml); repeating the defaults
here keeps the operator correct against objects written before a default existed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


def parse(spec: Mapping[str, Any]) -> TaskQueueSpec:
    redis = spec.get("redis", {})
    secret = redis.get("secretRef", {})
    worker = spec.get("worker", {})
    scaling = spec.get("scaling", {})
    grace = int(spec.get("drain", {}).get("graceSeconds", 60))
    retry = spec.get("retry", {})
    classes = []
    for priority in PRIORITY_CLASSES:
        raw = spec.get("classes", {}).get(priority, {})
        policy = ScalingPolicy(
            min_replicas=int(raw.get("minReplicas", 0)),
            max_replicas=int(raw.get("maxReplicas", 10)),
            target_backlog=int(raw.get("targetBacklogPerReplica", 10)),
            activation_backlog=int(raw.get("activationBacklog", 0)),
            tolerance=float(scaling.get("tolerance", 0.1)),
            scale_up_window=float(scaling.get("scaleUpStabilizationSeconds", 0)),
            scale_down_window=float(scaling.get("scaleDownStabilizationSeconds", 300)),
            max_step_up=int(scaling.get("maxScaleUpStep", 0)),
            max_step_down=int(scaling.get("maxScaleDownStep", 0)),
        )
        classes.append(
            ClassSpec(
                priority, policy, int(raw.get("concurrency", 16)), int(raw.get("processes", 1))
            )
        )
    return TaskQueueSpec(
        queue=spec.get("queue", "default"),
        paused=bool(spec.get("paused", False)),
        secret_name=secret.get("name", ""),
        url_key=secret.get("urlKey", "url"),
        password_key=secret.get("passwordKey"),
        tls=bool(redis.get("tls", False)),
        image=worker.get("image", ""),
        image_pull_policy=worker.get("imagePullPolicy", "IfNotPresent"),
        modules=tuple(worker.get("modules", ())),
        command=tuple(worker.get("command", ())),
        env=tuple(worker.get("env", ())),
        resources=worker.get("resources", {}),
        service_account=worker.get("serviceAccountName"),
        grace_seconds=grace,
        termination_grace_seconds=int(
            worker.get("terminationGracePeriodSeconds", grace + DRAIN_MARGIN)
        ),
        metrics_port=int(worker.get("metricsPort", 9808)),
        poll_interval=float(scaling.get("pollIntervalSeconds", 5)),
        backoff_base=float(retry.get("backoffBaseSeconds", 1)),
        backoff_cap=float(retry.get("backoffCapSeconds", 3600)),
        classes=tuple(classes),
        rate_limits=spec.get("rateLimits", {}),
        schedules=tuple(spec.get("schedules", ())),
    )


def rate_limits(spec: TaskQueueSpec) -> dict[str, str]:
    """The spec's rate limits in the ``limits`` hash format (``<count>:<window ms>``)."""
    out = {}
    default = spec.rate_limits.get("default")
    if default:
        out["*"] = f"{int(default['count'])}:{round(float(default['perSeconds']) * 1000)}"
    for group, limit in (spec.rate_limits.get("groups") or {}).items():
        out[group] = f"{int(limit['count'])}:{round(float(limit['perSeconds']) * 1000)}"
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
