"""Notices a watch stream that has gone blind, so the liveness probe stops saying OK (K03).

Kopf re-opens a watch that ends or fails, and the watch timeouts bound one that a middlebox
silently dropped; but a watch can still deliver nothing for good (every re-watch hanging, a
Kopf bug, a stuck worker), and then the operator is alive, "healthy" and blind. Only the API
server can prove otherwise, so every ``interval`` seconds the guard lists the objects the
watches serve and checks that each listed ``resourceVersion`` has reached the event handlers
within ``grace`` seconds of the listing first showing it. An object the handlers have not
caught up with by then makes the liveness probe fail and names the blind watch.

A listing that fails proves nothing either way and changes nothing: an API server that cannot
be reached at all costs the Lease, which ends the process (see leader.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from conveyor_operator.kube import Kube
from conveyor_operator.manifests import LABEL_TASKQUEUE
from conveyor_operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

TASKQUEUES = PLURAL
DEPLOYMENTS = "deployments"
Listed = tuple[str, str, str]
"""(uid, namespace/name, resourceVersion) of one listed object."""


def _caught_up(seen: str | None, listed: str) -> bool:
    if seen is None:
        return False
    # Kopf hands handlers only the newest event of a quick burst, so an intermediate version
    # may never be seen. Versions are opaque by contract, but etcd's are integers; anything
    # else can only be compared for equality.
    try:
        return int(seen) >= int(listed)
    except ValueError:
        return seen == listed


@dataclass
class _Pending:
    name: str
    version: str
    since: float


class WatchGuard:
    def __init__(
        self,
        kube: Kube,
        namespaces: Iterable[str] = (),
        *,
        interval: float,
        grace: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.namespaces = tuple(namespaces)
        self.interval = interval
        self.grace = grace
        self.clock = clock
        self._seen: dict[str, dict[str, str]] = {TASKQUEUES: {}, DEPLOYMENTS: {}}
        self._pending: dict[str, dict[str, _Pending]] = {TASKQUEUES: {}, DEPLOYMENTS: {}}
        self._blind: dict[str, str] = {}

    # -- fed by the event handlers -----------------------------------------------------------

    def seen(self, resource: str, body: Any, *, deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        uid, version = meta.get("uid"), meta.get("resourceVersion")
        if not uid:
            return
        if deleted:
            self._seen[resource].pop(uid, None)
            self._pending[resource].pop(uid, None)
        elif version:
            self._seen[resource][uid] = version

    # -- the check ---------------------------------------------------------------------------

    def check(self, resource: str, listed: Iterable[Listed]) -> None:
        """Compare one listing with what the handlers have seen; update the verdict."""
        now = self.clock()
        seen = self._seen[resource]
        before = self._pending[resource]
        pending: dict[str, _Pending] = {}
        for uid, name, version in listed:
            if _caught_up(seen.get(uid), version):
                continue
            # The earliest sighting counts: an object that keeps changing under a blind
            # watch must not reset its own clock.
            old = before.get(uid)
            pending[uid] = _Pending(name, version, old.since if old else now)
        self._pending[resource] = pending
        late = [p for p in pending.values() if now - p.since > self.grace]
        if late:
            worst = min(late, key=lambda p: p.since)
            reason = (
                f"the {resource} watch is blind: {worst.name} at resourceVersion "
                f"{worst.version} was listed {now - worst.since:.0f}s ago and never delivered"
            )
            if resource not in self._blind:
                log.error(reason, extra={"event": "watch_blind"})
            self._blind[resource] = reason
        elif self._blind.pop(resource, None) is not None:
            log.info(
                "the %s watch delivers events again",
                resource,
                extra={"event": "watch_recovered"},
            )

    def health(self) -> tuple[bool, str]:
        """For the liveness probe: False while any watch the operator needs is blind."""
        if self._blind:
            return False, "; ".join(self._blind[r] for r in sorted(self._blind))
        return True, "alive"

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for resource, lister in ((TASKQUEUES, self._taskqueues), (DEPLOYMENTS, self._workers)):
                try:
                    listed = await asyncio.to_thread(lister)
                except ApiException as exc:
                    log.debug("watch check of %s could not list: %s", resource, exc.reason)
                    continue
                self.check(resource, listed)

    def _scopes(self) -> tuple[str | None, ...]:
        return self.namespaces or (None,)

    def _taskqueues(self) -> list[Listed]:
        out: list[Listed] = []
        for ns in self._scopes():
            if ns is None:
                listing = self.kube.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
            else:
                listing = self.kube.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
            for item in listing.get("items", ()):
                meta = item["metadata"]
                out.append(
                    (meta["uid"], f"{meta['namespace']}/{meta['name']}", meta["resourceVersion"])
                )
        return out

    def _workers(self) -> list[Listed]:
        out: list[Listed] = []
        for ns in self._scopes():
            if ns is None:
                listing = self.kube.apps.list_deployment_for_all_namespaces(
                    label_selector=LABEL_TASKQUEUE
                )
            else:
                listing = self.kube.apps.list_namespaced_deployment(
                    ns, label_selector=LABEL_TASKQUEUE
                )
            for dep in listing.items:
                meta = dep.metadata
                out.append((meta.uid, f"{meta.namespace}/{meta.name}", meta.resource_version))
        return out
