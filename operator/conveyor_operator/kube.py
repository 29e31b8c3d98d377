"""The Kubernetes calls the operator makes, each written to avoid a known failure.

- Replicas go through the ``scale`` subresource as a merge patch without a resourceVersion, so
  a concurrent edit of the Deployment never turns into a 409 loop or a lost update (K08).
- Status goes through the ``status`` subresource (a patch of the main object would be dropped).
- Repeated events are aggregated into one Event whose ``series.count`` grows, instead of a new
  object per poll (K02, K06).
The client is synchronous; callers run these in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import base64
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conveyor_operator.spec import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)
CONTROLLER = "conveyor-operator"


def now() -> datetime:
    return datetime.now(UTC)


def preload() -> None:
    """Import the client's API modules now, while waiting for the Lease: the first use of
    ``CoreV1Api`` alone costs seconds of CPU (its generated models), which would otherwise
    delay the first poll after start-up or failover by as much."""
    for name in ("CoreV1Api", "AppsV1Api", "CustomObjectsApi", "EventsV1Api", "AutoscalingV2Api"):
        getattr(client, name)


def bound_requests(api: client.ApiClient, connect: float, read: float) -> None:
    """Give every request of ``api`` a timeout, and report transport failures as ApiException.

    The generated client waits forever by default: a pooled connection that a middlebox
    silently dropped (K03) would hang a reconcile, a poll or the Lease renewal for good, with
    the process still "healthy". Status 0 is what the client itself uses for TLS failures, so
    every caller that handles ApiException handles a timeout too.
    """
    inner: Callable[..., Any] = api.rest_client.request
    # urllib3 retries an idempotent request three times by default, so one GET on a dead path
    # would take four timeouts; a read that timed out is not retried at all (callers retry).
    api.rest_client.pool_manager.connection_pool_kw["retries"] = urllib3.Retry(
        total=1, read=0, redirect=0
    )

    def request(*args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        try:
            return inner(*args, _request_timeout=_request_timeout or (connect, read), **kwargs)
        except urllib3.exceptions.HTTPError as exc:
            raise ApiException(status=0, reason=f"API server unreachable: {exc}") from exc

    api.rest_client.request = request


def unreachable(exc: ApiException) -> bool:
    """Whether ``exc`` is a transport failure (timeout, reset) rather than an API answer."""
    return not exc.status


@dataclass
class Kube:
    api: client.ApiClient
    instance: str = field(default_factory=socket.gethostname)
    _events: dict[tuple[str, str, str], tuple[str, int]] = field(default_factory=dict)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def read_taskqueue(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def namespace_terminating(self, namespace: str) -> bool:
        try:
            ns = self.core.read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return ns.metadata.deletion_timestamp is not None or (
            ns.status is not None and ns.status.phase == "Terminating"
        )

    def read_deployment(self, namespace: str, name: str) -> Any:
        """The Deployment, or None if it does not exist."""
        try:
            return self.apps.read_namespaced_deployment(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_deployment(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create ``body``; False if a Deployment of that name appeared meanwhile (409)."""
        try:
            self.apps.create_namespaced_deployment(namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def ensure_service(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create the Service unless it exists; True if this call created it."""
        try:
            self.core.read_namespaced_service(body["metadata"]["name"], namespace)
            return False
        except ApiException as exc:
            if exc.status != 404:
                raise
        try:
            self.core.create_namespaced_service(namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def deployments(self, namespace: str, taskqueue: str) -> dict[str, Any]:
        """The TaskQueue's worker Deployments by name (label selector, one LIST)."""
        items = self.apps.list_namespaced_deployment(
            namespace, label_selector=f"conveyor.dev/taskqueue={taskqueue}"
        ).items
        return {d.metadata.name: d for d in items}

    def autoscalers(self, namespace: str) -> dict[str, str]:
        """Deployment name → ``HorizontalPodAutoscaler/<name>`` of every HPA targeting one."""
        items = (
            client.AutoscalingV2Api(self.api)
            .list_namespaced_horizontal_pod_autoscaler(namespace)
            .items
        )
        return {
            hpa.spec.scale_target_ref.name: f"HorizontalPodAutoscaler/{hpa.metadata.name}"
            for hpa in items
            if hpa.spec.scale_target_ref.kind == "Deployment"
        }

    def scale(self, namespace: str, deployment: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(
            deployment, namespace, {"spec": {"replicas": replicas}}
        )

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )

    def event(
        self,
        owner: dict[str, Any],
        reason: str,
        message: str,
        *,
        warning: bool = False,
        aggregate: bool = False,
    ) -> None:
        """Post an Event about ``owner``; with ``aggregate``, a repeat bumps ``series.count``."""
        meta = owner["metadata"]
        namespace, key = meta["namespace"], (meta["namespace"], meta["name"], reason)
        events = client.EventsV1Api(self.api)
        stamp = now()
        try:
            if aggregate and key in self._events:
                name, count = self._events[key]
                events.patch_namespaced_event(
                    name,
                    namespace,
                    {
                        "series": {"count": count + 1, "lastObservedTime": stamp.isoformat()},
                        "note": message[:1024],
                    },
                )
                self._events[key] = (name, count + 1)
                return
            body = client.EventsV1Event(
                # Event names must be complete DNS subdomains, so no trailing-dot generateName.
                metadata=client.V1ObjectMeta(
                    name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=namespace
                ),
                event_time=stamp,
                reporting_controller=CONTROLLER,
                reporting_instance=self.instance,
                action="Scale" if reason.startswith("Scaled") else "Reconcile",
                reason=reason,
                note=message[:1024],
                type="Warning" if warning else "Normal",
                regarding=client.V1ObjectReference(
                    api_version=f"{GROUP}/{VERSION}",
                    kind=KIND,
                    name=meta["name"],
                    namespace=namespace,
                    uid=meta.get("uid"),
                ),
            )
            created = events.create_namespaced_event(namespace, body)
            if aggregate:
                self._events[key] = (created.metadata.name, 1)
        except ApiException as exc:
            # An event is information; failing to post one must not stop scaling.
            log.warning(
                "cannot post event %s: %s %s",
                reason,
                exc.reason,
                exc.body,
                extra={"event": "event_failed"},
            )

    def end_series(self, namespace: str, name: str, reason: str) -> None:
        """The condition behind an aggregated event is over: the next one starts a new Event."""
        self._events.pop((namespace, name, reason), None)
