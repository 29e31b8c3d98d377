"""Leader election on a ``coordination.k8s.io`` Lease: exactly one operator replica acts.

Kopf's peering compares priorities and lets equal peers act together, which is not leader
election. Here a replica runs the operator only while it holds the Lease; a standby polls and
takes over once the holder stops renewing for ``duration`` seconds. A leader that cannot renew
in time stops acting at once (the caller exits), so two replicas never act in one interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class LeaseElector:
    def __init__(
        self,
        api: client.CoordinationV1Api,
        namespace: str,
        *,
        name: str,
        identity: str,
        duration: float = 15.0,
        renew_every: float = 5.0,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew_every = renew_every
        self.timeout = max(1.0, renew_every)
        """Bound of one Lease request outside renewal (acquire, release)."""
        self._renewed_at = 0.0

    def _try(self, timeout: float) -> bool:
        """One attempt to take or renew the Lease; True while this replica holds it."""
        now = _now()
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=int(self.duration),
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
            except ApiException as create_exc:
                if create_exc.status == 409:
                    return False
                raise
            return True
        spec = lease.spec
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        if held_by_other and spec.renew_time is not None:
            expires = spec.renew_time.timestamp() + (spec.lease_duration_seconds or 0)
            if expires > now.timestamp():
                return False
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            log.info(
                "taking over operator lease from %r",
                spec.holder_identity,
                extra={"event": "lease_acquired"},
            )
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = int(self.duration)
        try:
            # The read's resourceVersion makes this a compare-and-swap: a racing replica gets 409.
            self.api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def acquire(self, stopping: threading.Event) -> bool:
        """Block until this replica leads (True) or ``stopping`` is set (False)."""
        while not stopping.is_set():
            try:
                if self._try(self.timeout):
                    self._renewed_at = time.monotonic()
                    return True
            except ApiException as exc:
                log.warning("lease read failed: %s", exc.reason, extra={"event": "lease_error"})
            stopping.wait(self.renew_every / 2)
        return False

    def keep(self, stopping: threading.Event, on_lost: Callable[[], None]) -> None:
        """Renew until ``stopping``; call ``on_lost`` once renewal fails past the deadline.

        As client-go's elector: a failed renewal is retried at once, each attempt bounded by
        half the time left, so one dead pooled connection costs one short timeout, not the Lease;
        and a replica that cannot renew stops acting before a standby may take over.
        """
        while not stopping.wait(self.renew_every):
            deadline = self._renewed_at + self.duration - self.renew_every
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("lost the operator lease; stopping", extra={"event": "lease_lost"})
                    on_lost()
                    return
                try:
                    # Half the time left, so a retry on a fresh connection still fits in.
                    if self._try(min(self.timeout, max(0.5, left / 2))):
                        self._renewed_at = time.monotonic()
                        break
                except ApiException as exc:
                    log.warning(
                        "lease renewal failed: %s", exc.reason, extra={"event": "lease_error"}
                    )
                if stopping.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                    return

    def release(self) -> None:
        """Hand the Lease over at once on a clean exit instead of making the standby wait."""
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self.timeout
            )
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""
                lease.spec.renew_time = None
                self.api.replace_namespaced_lease(
                    self.name, self.namespace, lease, _request_timeout=self.timeout
                )
        except ApiException as exc:
            log.debug("lease release failed: %s", exc.reason)
