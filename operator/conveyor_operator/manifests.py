"""The objects a TaskQueue owns: one worker Deployment per priority class and a metrics Service.

Manifests never carry ``spec.replicas`` after creation: replicas belong to the autoscaler,
which writes them through the ``scale`` subresource, so re-applying a template (a new image, a
``kubectl apply`` of the TaskQueue, a Helm upgrade) can never reset a class's size.
"""

from __future__ import annotations

from typing import Any

from conveyor_operator.spec import ClassSpec, TaskQueueSpec

LABEL_TASKQUEUE = "conveyor.dev/taskqueue"
LABEL_CLASS = "conveyor.dev/class"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = {"app.kubernetes.io/managed-by": "conveyor-operator"}
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
WORKER_UID = 10001


def deployment_name(taskqueue: str, priority: str) -> str:
    return f"{taskqueue}-{priority}"


def service_name(taskqueue: str) -> str:
    return f"{taskqueue}-workers"


def selector(taskqueue: str, priority: str) -> dict[str, str]:
    return {LABEL_TASKQUEUE: taskqueue, LABEL_CLASS: priority}


def _env(spec: TaskQueueSpec, cls: ClassSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {
            "name": "REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": spec.url_key}},
        },
    ]
    if spec.password_key:
        env.append(
            {
                "name": "REDIS_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": spec.password_key}},
            }
        )
    plain = {
        "CONVEYOR_QUEUE": spec.queue,
        "CONVEYOR_CLASSES": cls.priority,
        "CONVEYOR_CONCURRENCY": str(cls.concurrency),
        "CONVEYOR_PROCESSES": str(cls.processes),
        "CONVEYOR_GRACE": str(spec.grace_seconds),
        "CONVEYOR_METRICS_PORT": str(spec.metrics_port),
        "CONVEYOR_LOG_FORMAT": "json",
        "CONVEYOR_REDIS_TLS": "true" if spec.tls else "false",
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/conveyor-metrics",
    }
    env += [{"name": k, "value": v} for k, v in plain.items()]
    env += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    return env + [dict(e) for e in spec.env]


def deployment(name: str, spec: TaskQueueSpec, cls: ClassSpec) -> dict[str, Any]:
    """The worker Deployment of one class, without ``spec.replicas`` (see module docstring)."""
    labels = {**selector(name, cls.priority), LABEL_COMPONENT: "worker", **MANAGED_BY}
    command = list(spec.command) or ["conveyor", "worker", *spec.modules]
    probe_port = spec.metrics_port
    container: dict[str, Any] = {
        "name": "worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "env": _env(spec, cls),
        "ports": [{"name": "metrics", "containerPort": probe_port}],
        # Readiness turns false the moment a drain starts; liveness only when the supervisor
        # or its workers stop answering.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 5,
            "failureThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "resources": dict(spec.resources),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": spec.termination_grace_seconds,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "securityContext": {"runAsNonRoot": True, "fsGroup": WORKER_UID},
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(name, cls.priority), "labels": labels},
        "spec": {
            "selector": {"matchLabels": selector(name, cls.priority)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"},
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def service(name: str, spec: TaskQueueSpec) -> dict[str, Any]:
    """A headless Service over every worker pod of the TaskQueue, for Prometheus to scrape."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "labels": {LABEL_TASKQUEUE: name, LABEL_COMPONENT: "worker", **MANAGED_BY},
        },
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_TASKQUEUE: name, LABEL_COMPONENT: "worker"},
            "ports": [{"name": "metrics", "port": spec.metrics_port, "targetPort": "metrics"}],
        },
    }
