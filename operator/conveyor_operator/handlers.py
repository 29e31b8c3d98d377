"""Kopf handlers: keep each TaskQueue's worker Deployments and Service as its spec says.

No handler here needs a finalizer: there is no deletion handler, timer or daemon on TaskQueues.
Children carry an owner reference (``kopf.adopt``), so the garbage collector removes them when
the TaskQueue goes, with or without a running operator (K01, K11).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException

from conveyor.keys import PRIORITY_CLASSES
from conveyor_operator import manifests
from conveyor_operator.kube import unreachable
from conveyor_operator.metrics import RECONCILES
from conveyor_operator.runtime import runtime
from conveyor_operator.spec import GROUP, PLURAL, VERSION, InvalidSpec, TaskQueueSpec, parse
from conveyor_operator.watchdog import DEPLOYMENTS

log = logging.getLogger(__name__)
RETRY_CAP = 20.0
"""Longest wait between reconcile retries: a late Secret is served within this (K02)."""
WATCH_TIMEOUT = 60.0
"""Set from the operator's settings before Kopf starts."""
REQUEST_TIMEOUT = 30.0
"""Set from the operator's settings before Kopf starts."""


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf's defaults wait forever on a silently dead watch (K03): bound every watch request.
    settings.watching.server_timeout = round(WATCH_TIMEOUT)
    settings.watching.client_timeout = round(WATCH_TIMEOUT + 10)
    settings.watching.connect_timeout = 10
    # Kopf would otherwise watch every CRD in the cluster to notice new resource kinds, which
    # needs cluster-wide CRD rights the chart does not grant (K12): without them it logs 403s
    # for a minute before giving up. TaskQueues and Deployments are known at start-up.
    settings.scanning.disabled = True
    settings.networking.request_timeout = REQUEST_TIMEOUT
    # A request still failing after these retries ends Kopf, and so the process: a watcher
    # refused for good (a 403 after an RBAC change) must not leave a running, "healthy" but
    # blind operator. Kopf's default retries for 54 s; K03 allows 60 s until a restart.
    settings.networking.error_backoffs = (1, 2, 4, 8, 15)
    # Handler progress lives in annotations of the TaskQueue, never in a status Kopf could lose
    # to pruning, and never on Deployments or Pods.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="conveyor.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="conveyor.dev", key="last-handled-configuration"
    )
    # The operator posts its own Events, aggregated (K02, K06); Kopf's would add one object per
    # handler retry.
    settings.posting.enabled = False
    # Kopf logs every successful handler call at INFO; on busy Deployments that would bury the
    # operator's own decisions.
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
    settings.execution.max_workers = 4


def _template_mismatch(live: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Fields of a live Deployment (as a dict) that differ from what the TaskQueue asks for."""
    pod = wanted["spec"]["template"]["spec"]
    container = pod["containers"][0]
    live_pod = live.get("spec", {}).get("template", {}).get("spec", {})
    live_container = (live_pod.get("containers") or [{}])[0]
    drift = []
    for key in ("image", "command"):
        if live_container.get(key) != container[key]:
            drift.append(key)
    if live_pod.get("terminationGracePeriodSeconds") != pod["terminationGracePeriodSeconds"]:
        drift.append("terminationGracePeriodSeconds")
    return drift


def ensure_children(body: dict[str, Any], spec: TaskQueueSpec, *, initial: int = 0) -> list[str]:
    """Create missing children and repair drifted ones; returns what changed."""
    kube = runtime().kube
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    changed = []
    for cls in spec.classes:
        wanted = manifests.deployment(name, spec, cls)
        kopf.adopt(wanted, owner=cast(kopf.Body, body))
        dep_name = wanted["metadata"]["name"]
        live = kube.read_deployment(namespace, dep_name)
        if live is None:
            wanted["spec"]["replicas"] = max(initial, cls.policy.min_replicas)
            if kube.create_deployment(namespace, wanted):
                changed.append(f"created {dep_name}")
                continue
            # Created meanwhile by a concurrent pass (reconcile and drift repair race after a
            # quick delete and re-create): check that one's template and owner instead.
            live = kube.apps.read_namespaced_deployment(dep_name, namespace)
        drift = _template_mismatch(kube.api.sanitize_for_serialization(live), wanted)
        if drift:
            # A strategic merge patch without `replicas`: the scale belongs to the autoscaler.
            kube.apps.patch_namespaced_deployment(dep_name, namespace, wanted)
            changed.append(f"updated {dep_name} ({', '.join(drift)})")
        owners = [o.uid for o in live.metadata.owner_references or []]
        if owners != [meta["uid"]]:
            # A JSON patch replaces the list: a merge would keep a dead owner's reference.
            refs = wanted["metadata"]["ownerReferences"]
            kube.apps.patch_namespaced_deployment(
                dep_name,
                namespace,
                [
                    {
                        "op": "replace" if owners else "add",
                        "path": "/metadata/ownerReferences",
                        "value": refs,
                    }
                ],
            )
            changed.append(f"adopted {dep_name}")
    svc = manifests.service(name, spec)
    kopf.adopt(svc, owner=cast(kopf.Body, body))
    if kube.ensure_service(namespace, svc):
        changed.append(f"created {svc['metadata']['name']}")
    return changed


def _still_wanted(owner: dict[str, Any]) -> bool:
    """Whether a deleted child should come back. Not if its TaskQueue or its namespace is being
    deleted: the garbage collector and the namespace controller remove children before the
    TaskQueue's own DELETED event has necessarily reached this process."""
    kube = runtime().kube
    meta = owner["metadata"]
    live = kube.read_taskqueue(meta["namespace"], meta["name"])
    if live is None or live["metadata"].get("deletionTimestamp") is not None:
        return False
    return live["metadata"].get("uid") == meta.get("uid") and not kube.namespace_terminating(
        meta["namespace"]
    )


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, retry: int, **_: Any) -> None:
    state = runtime()
    owner = dict(body)
    meta = owner["metadata"]
    try:
        spec = parse(owner.get("spec", {}))
    except InvalidSpec as exc:
        # What the CRD schema cannot express. No retry can fix it; the next edit of the spec
        # runs this handler again. Kopf posts the message as an Event on the TaskQueue.
        RECONCILES.labels("invalid").inc()
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    try:
        secret = await asyncio.to_thread(
            state.kube.read_secret, meta["namespace"], spec.secret_name
        )
        changed = [] if secret is None else await asyncio.to_thread(ensure_children, owner, spec)
    except ApiException as exc:
        if not unreachable(exc):
            raise
        # A timeout is no bug in this handler: retry soon, without a traceback in the log.
        raise kopf.TemporaryError(exc.reason, delay=min(RETRY_CAP, 2.0 * 2**retry)) from exc
    if secret is None:
        # The scaler reports the missing Secret (condition and one aggregated Event): a second
        # report from here would overwrite its conditions and post a second Event (K02).
        RECONCILES.labels("waiting").inc()
        raise kopf.TemporaryError(
            f"Secret {spec.secret_name!r} not found in {meta['namespace']}",
            delay=min(RETRY_CAP, 2.0 * 2**retry),
        )
    state.scaler.track(owner)
    RECONCILES.labels("ok").inc()
    if changed:
        log.info(
            "%s/%s reconciled: %s",
            meta["namespace"],
            meta["name"],
            "; ".join(changed),
            extra={"event": "reconciled", "taskqueue": meta["name"]},
        )


@kopf.on.event(GROUP, VERSION, PLURAL)
def track(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Keeps the scaler's view of TaskQueues current, without storing any handler state."""
    state = runtime()
    scaler = state.scaler
    meta = body["metadata"]
    state.guard.seen(PLURAL, body, deleted=event.get("type") == "DELETED")
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp") is not None:
        # A TaskQueue being deleted (foreground deletion keeps it visible until its children
        # are gone) is neither scaled nor repaired: that would fight the garbage collector.
        scaler.forget(meta["namespace"], meta["name"])
    else:
        try:
            scaler.track(dict(body))
        except InvalidSpec as exc:
            # The scaler keeps acting on the last valid spec: a typo must not scale to zero.
            log.warning(
                "%s/%s has an invalid spec, still scaling by the last valid one: %s",
                meta["namespace"],
                meta["name"],
                exc,
                extra={"event": "invalid_spec", "taskqueue": meta["name"]},
            )


@kopf.on.event("apps", "v1", "deployments", labels={manifests.LABEL_TASKQUEUE: kopf.PRESENT})
async def repair(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Restores a worker Deployment deleted or edited by hand (drift correction)."""
    state = runtime()
    meta = body["metadata"]
    state.guard.seen(DEPLOYMENTS, body, deleted=event.get("type") == "DELETED")
    owner_name = meta.get("labels", {}).get(manifests.LABEL_TASKQUEUE)
    known = state.scaler.known.get((meta["namespace"], owner_name or ""))
    if known is None or event.get("type") not in ("DELETED", "MODIFIED"):
        return
    if event["type"] == "MODIFIED":
        cls = known.spec.cls(meta.get("labels", {}).get(manifests.LABEL_CLASS, "normal"))
        wanted = manifests.deployment(owner_name or "", known.spec, cls)
        if not _template_mismatch(dict(body), wanted):
            return
    elif not await asyncio.to_thread(_still_wanted, known.body):
        return
    current = {p: known.written.get(p, 0) for p in PRIORITY_CLASSES}
    changed = await asyncio.to_thread(
        ensure_children,
        known.body,
        known.spec,
        initial=current.get(meta.get("labels", {}).get(manifests.LABEL_CLASS, ""), 0),
    )
    if changed:
        log.warning(
            "%s/%s repaired drift: %s",
            meta["namespace"],
            owner_name,
            "; ".join(changed),
            extra={"event": "drift_repaired", "taskqueue": owner_name},
        )
        await asyncio.to_thread(state.kube.event, known.body, "DriftRepaired", "; ".join(changed))
