"""Marking idle worker pods cheaper to delete right before a scale-down (B28, K14).

The ReplicaSet controller removes pods with the lowest ``pod-deletion-cost`` first. Costs come
from the workers' own heartbeats in Redis: idle pods get 0, busy pods a high cost. They are
written only just before lowering replicas (the KEP advises against frequent updates), and the
scale write waits until the annotations are visible plus a settle delay, because the ReplicaSet
controller ranks pods from its informer cache.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from conveyor_operator.backlog import BacklogReader, BacklogUnavailable, RedisTarget
from conveyor_operator.kube import Kube
from conveyor_operator.manifests import DELETION_COST

log = logging.getLogger(__name__)
BUSY_COST = 1_000_000
SETTLE_SECONDS = 1.0


async def annotate_for_scale_down(
    kube: Kube, reader: BacklogReader, target: RedisTarget, namespace: str, dep: Any
) -> str | None:
    """Rank the Deployment's pods for the coming scale-down; returns why the operator may not
    annotate pods (a 403), or None. Any other failure leaves the scale-down unranked."""
    selector = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())
    try:
        busy = await reader.workers(target)
    except BacklogUnavailable as exc:
        log.warning("no worker heartbeats for deletion costs (%s); scaling down unranked", exc)
        return None
    pods = await asyncio.to_thread(
        kube.core.list_namespaced_pod, namespace, label_selector=selector
    )
    stale = []
    for pod in pods.items:
        slots, _ = busy.get(pod.metadata.name, (0, ""))
        cost = str(BUSY_COST + slots if slots else 0)
        if (pod.metadata.annotations or {}).get(DELETION_COST) != cost:
            stale.append((pod.metadata.name, cost))
    # In parallel (bounded by the default thread pool): one at a time, the patches of a large
    # Deployment would hold its scale-down back by seconds.
    refused = [
        reason
        for reason in await asyncio.gather(
            *(asyncio.to_thread(_annotate, kube, namespace, pod, cost) for pod, cost in stale)
        )
        if reason is not None
    ]
    if refused:
        log.warning(
            "not allowed to annotate pods (%s); scaling down unranked",
            refused[0],
            extra={"event": "deletion_cost_forbidden"},
        )
        return f"patch of pods forbidden: {refused[0]}"
    if stale:
        await asyncio.sleep(SETTLE_SECONDS)
    return None


def _annotate(kube: Kube, namespace: str, pod: str, cost: str) -> str | None:
    """Set one pod's deletion cost; returns the reason of a 403, None otherwise."""
    try:
        kube.core.patch_namespaced_pod(
            pod, namespace, {"metadata": {"annotations": {DELETION_COST: cost}}}
        )
    except ApiException as exc:
        if exc.status == 403:
            return str(exc.reason)
        if exc.status != 404:
            raise
    return None
