"""The autoscaling loop: one asyncio task for every TaskQueue the operator knows.

It is deliberately not a Kopf timer or daemon: those put a finalizer on the TaskQueue, which
then cannot be deleted while the operator is down (K01). TaskQueues enter and leave the
``known`` map through a finalizer-free event handler; this loop polls each one at its own
interval: read the backlog from Redis, decide replicas per class, annotate pod deletion costs
before a scale-down, patch the scale subresource, and write status only when it changed.
On any failure to read the backlog it holds every replica count (never scales on missing data).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes.client.exceptions import ApiException
from redis.typing import EncodableT, FieldT

from conveyor.errors import ConfigError
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.queue import ClassStats
from conveyor.schedule import Scheduler
from conveyor_operator import conditions
from conveyor_operator.autoscale import Backlog, Decision, Recommendations, decide
from conveyor_operator.backlog import BacklogReader, BacklogUnavailable, RedisTarget
from conveyor_operator.deletion_cost import annotate_for_scale_down
from conveyor_operator.kube import Kube, now, unreachable
from conveyor_operator.manifests import deployment_name
from conveyor_operator.metrics import LAST_POLL, POLL_ERRORS, SCALE_WRITES
from conveyor_operator.spec import TaskQueueSpec, parse, rate_limits, schedules_of

log = logging.getLogger(__name__)
SECRET_BACKOFF_CAP = 20.0
"""Longest wait between reads of a missing Secret (K02: served within 30 s of appearing)."""


@dataclass
class Known:
    """What the loop keeps per TaskQueue between polls."""

    body: dict[str, Any]
    spec: TaskQueueSpec
    next_poll: float = 0.0
    histories: dict[str, Recommendations] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    """Replicas this operator last wrote per class: anything else was set by someone else."""
    last_status: dict[str, Any] = field(default_factory=dict)
    class_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    secret_failures: int = 0
    outage: str | None = None
    applied_limits: dict[str, str] = field(default_factory=dict)
    scheduler: Scheduler | None = None
    cost_forbidden: str | None = None
    """Why the last scale-down could not annotate pods, until one can again."""
    conflicts: dict[str, str] = field(default_factory=dict)
    """Classes whose Deployment another autoscaler targets, with that autoscaler's name."""
    started: dict[str, int] = field(default_factory=dict)
    """Jobs started per class since the queue was created, as of the previous poll."""
    gone: bool = False
    """Set when the TaskQueue is deleted: a poll still in flight must not write any more."""


class Scaler:
    def __init__(self, kube: Kube, identity: str) -> None:
        self.kube = kube
        self.identity = identity
        self.reader = BacklogReader()
        self.known: dict[tuple[str, str], Known] = {}

    def track(self, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        entry = self.known.get(key)
        spec = parse(body.get("spec", {}))
        if entry is None or entry.body["metadata"].get("uid") != body["metadata"].get("uid"):
            self.known[key] = Known(body, spec)
        else:
            if spec.schedules != entry.spec.schedules:
                entry.scheduler = None
            entry.body, entry.spec = body, spec

    def forget(self, namespace: str, name: str) -> None:
        entry = self.known.pop((namespace, name), None)
        if entry is not None:
            entry.gone = True

    async def run(self) -> None:
        # Each TaskQueue polls in its own task: one whose Redis hangs until the probe timeout
        # must not delay the scaling of every other TaskQueue.
        polling: dict[tuple[str, str], asyncio.Task[None]] = {}
        try:
            while True:
                now = time.monotonic()
                for key, entry in list(self.known.items()):
                    busy = polling.get(key)
                    if (busy is None or busy.done()) and entry.next_poll <= now:
                        entry.next_poll = now + entry.spec.poll_interval
                        polling[key] = asyncio.create_task(self._poll_logged(entry))
                for key in [k for k, task in polling.items() if task.done()]:
                    del polling[key]
                await asyncio.sleep(0.2)
        finally:
            for task in polling.values():
                task.cancel()
            await asyncio.gather(*polling.values(), return_exceptions=True)

    async def _poll_logged(self, entry: Known) -> None:
        meta = entry.body["metadata"]
        try:
            await self.poll(entry)
        except Exception as exc:
            if isinstance(exc, ApiException) and unreachable(exc):
                # Replicas stay as they are; the next poll tries again on a fresh connection.
                log.warning(
                    "poll of %s/%s failed: %s",
                    meta["namespace"],
                    meta["name"],
                    exc.reason,
                    extra={"event": "poll_failed"},
                )
                return
            log.exception(
                "poll of %s/%s failed",
                meta["namespace"],
                meta["name"],
                extra={"event": "poll_failed"},
            )

    async def poll(self, entry: Known) -> None:
        meta = entry.body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        target = await self._target(entry)
        if target is None:
            return
        try:
            stats = await self.reader.read(target)
            started = await self.reader.started(target)
        except BacklogUnavailable as exc:
            await self._redis_down(entry, exc.reason, str(exc))
            return
        LAST_POLL.labels(namespace, name).set(time.time())
        if entry.outage is not None:
            log.info(
                "Redis reachable again for %s/%s",
                namespace,
                name,
                extra={"event": "redis_reachable", "taskqueue": name},
            )
            self.kube.end_series(namespace, name, _event_reason(entry.outage))
            entry.outage = None
        await self._sync_queue(entry, target)
        deployments = await asyncio.to_thread(self.kube.deployments, namespace, name)
        autoscalers = await asyncio.to_thread(self.kube.autoscalers, namespace)
        conflicts = {}
        for priority in PRIORITY_CLASSES:
            dep = deployments.get(deployment_name(name, priority))
            if dep is None:
                continue
            other = autoscalers.get(dep.metadata.name)
            if other is not None:
                conflicts[priority] = other
                continue
            # Unknown before the first poll (or a restart): only in-flight counts then.
            ran = started[priority] > entry.started.get(priority, started[priority])
            await self._scale_class(entry, priority, dep, stats[priority], target, ran=ran)
        entry.started = started
        await self._report_conflicts(entry, conflicts)
        await self._write_status(
            entry,
            stats,
            deployments,
            conditions.reachable(True, "Polled", "backlog read"),
            _scaling_condition(entry),
        )

    async def _report_cost_forbidden(self, entry: Known, forbidden: str | None) -> None:
        """Scale-downs go on unranked without the right to annotate pods (K12); say so once,
        and stop saying so as soon as an annotation succeeds again."""
        meta = entry.body["metadata"]
        if forbidden is None:
            if entry.cost_forbidden is not None:
                self.kube.end_series(meta["namespace"], meta["name"], "DeletionCostForbidden")
            entry.cost_forbidden = None
            return
        if entry.cost_forbidden is None and not entry.gone:
            await asyncio.to_thread(
                self.kube.event,
                entry.body,
                "DeletionCostForbidden",
                f"{forbidden}; scaling down without ranking busy pods last",
                warning=True,
                aggregate=True,
            )
        entry.cost_forbidden = forbidden

    async def _report_conflicts(self, entry: Known, conflicts: dict[str, str]) -> None:
        """Another autoscaler owns some classes' replicas (K07): stop writing them, and say so
        once per conflict rather than fighting it every poll."""
        meta = entry.body["metadata"]
        for priority in conflicts:
            # Its size is the other autoscaler's now: no ExternalScale event once it goes away.
            entry.written.pop(priority, None)
            entry.histories.pop(priority, None)
        new = {p: o for p, o in conflicts.items() if entry.conflicts.get(p) != o}
        if set(entry.conflicts) - set(conflicts):
            self.kube.end_series(meta["namespace"], meta["name"], "ConflictingAutoscaler")
        entry.conflicts = dict(conflicts)
        if new and not entry.gone:
            note = "; ".join(f"{p}: {o}" for p, o in sorted(new.items()))
            log.warning(
                "%s/%s: another autoscaler targets worker Deployments (%s); not scaling them",
                meta["namespace"],
                meta["name"],
                note,
                extra={"event": "conflicting_autoscaler", "taskqueue": meta["name"]},
            )
            await asyncio.to_thread(
                self.kube.event,
                entry.body,
                "ConflictingAutoscaler",
                f"{note}; the operator stops writing these classes' replicas",
                warning=True,
                aggregate=True,
            )

    async def _target(self, entry: Known) -> RedisTarget | None:
        meta = entry.body["metadata"]
        spec = entry.spec
        secret = await asyncio.to_thread(self.kube.read_secret, meta["namespace"], spec.secret_name)
        if secret is None or spec.url_key not in secret:
            entry.secret_failures += 1
            # Back off: a missing Secret is usually created minutes later (GitOps order).
            entry.next_poll = time.monotonic() + min(
                SECRET_BACKOFF_CAP, spec.poll_interval * 2 ** min(entry.secret_failures, 6)
            )
            missing = "not found" if secret is None else f"has no key {spec.url_key!r}"
            await self._redis_down(
                entry, "SecretNotFound", f"Secret {spec.secret_name!r} {missing}"
            )
            return None
        entry.secret_failures = 0
        password = None
        if spec.password_key and spec.password_key in secret:
            password = secret[spec.password_key].decode()
        return RedisTarget(secret[spec.url_key].decode(), password, spec.tls, spec.queue)

    async def _sync_queue(self, entry: Known, target: RedisTarget) -> None:
        """Apply the spec's rate limits and run its recurring schedules from here, so that both
        work even when every class of the TaskQueue is scaled to zero."""
        client = self.reader.client(target)
        keys = Keyspace(target.queue)
        wanted = rate_limits(entry.spec)
        if wanted != entry.applied_limits:
            async with client.pipeline(transaction=True) as pipe:
                stale = set(entry.applied_limits) - set(wanted)
                if stale:
                    pipe.hdel(keys.limits, *stale)
                if wanted:
                    pipe.hset(keys.limits, mapping=cast(dict[FieldT, EncodableT], wanted))
                await pipe.execute()
            entry.applied_limits = wanted
        if entry.spec.schedules:
            if entry.scheduler is None:
                try:
                    entry.scheduler = Scheduler(client, keys, schedules_of(entry.spec))
                except ConfigError as exc:
                    await asyncio.to_thread(
                        self.kube.event,
                        entry.body,
                        "InvalidSchedule",
                        str(exc),
                        warning=True,
                        aggregate=True,
                    )
                    return
            await entry.scheduler.run_once()

    async def _redis_down(self, entry: Known, reason: str, message: str) -> None:
        meta = entry.body["metadata"]
        POLL_ERRORS.labels(meta["namespace"], meta["name"], reason).inc()
        if entry.outage is not None and entry.outage != reason:
            # A different fault is a different Event (its reason may differ too).
            self.kube.end_series(meta["namespace"], meta["name"], _event_reason(entry.outage))
        if entry.outage != reason:
            log.warning(
                "%s/%s: backlog unavailable (%s): %s; holding replicas",
                meta["namespace"],
                meta["name"],
                reason,
                message,
                extra={"event": "redis_unreachable", "taskqueue": meta["name"]},
            )
            entry.outage = reason
        if entry.gone:
            return
        await asyncio.to_thread(
            self.kube.event,
            entry.body,
            _event_reason(reason),
            f"{reason}: {message}; replicas held",
            warning=True,
            aggregate=True,
        )
        status = dict(entry.last_status)
        status["conditions"] = conditions.merge(
            entry.last_status.get("conditions", []),
            conditions.reachable(False, reason, message),
            conditions.ready(False, reason, message),
        )
        await self._patch_status(entry, status)

    async def _scale_class(
        self,
        entry: Known,
        priority: str,
        dep: Any,
        stats: ClassStats,
        target: RedisTarget,
        *,
        ran: bool,
    ) -> None:
        meta = entry.body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        current = dep.spec.replicas or 0
        written = entry.written.get(priority)
        if written is not None and current != written:
            await asyncio.to_thread(
                self.kube.event,
                entry.body,
                "ExternalScale",
                f"{dep.metadata.name} was scaled to {current} by someone else; "
                "the autoscaler owns replicas and restores its decision",
            )
        history = entry.histories.setdefault(priority, Recommendations())
        policy = entry.spec.cls(priority).policy
        backlog = Backlog(stats.ready, stats.due_delayed, stats.in_flight, ran=ran)
        decision = decide(policy, backlog, current, history, time.monotonic())
        if entry.spec.paused:
            decision = Decision(0, 0, "TaskQueue is paused")
        class_status = entry.class_status.setdefault(priority, {})
        class_status["desiredReplicas"] = decision.replicas
        if not decision.changes(current):
            entry.written.setdefault(priority, current)
            return
        if entry.gone:
            return
        if 0 < decision.replicas < current:
            # Ranking matters only when some pods stay; a scale to zero removes them all.
            forbidden = await annotate_for_scale_down(
                self.kube, self.reader, target, namespace, dep
            )
            await self._report_cost_forbidden(entry, forbidden)
        try:
            await asyncio.to_thread(
                self.kube.scale, namespace, dep.metadata.name, decision.replicas
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return  # deleted by hand since the listing; drift repair re-creates it
        SCALE_WRITES.labels(namespace, name, priority).inc()
        entry.written[priority] = decision.replicas
        # The status this poll writes then shows the new size, not the one listed before it.
        dep.spec.replicas = decision.replicas
        class_status["lastScaleTime"] = now().isoformat().replace("+00:00", "Z")
        class_status["lastScaleReason"] = decision.reason
        log.info(
            "%s/%s %s: %d -> %d replicas (%s)",
            namespace,
            name,
            priority,
            current,
            decision.replicas,
            decision.reason,
            extra={"event": "scaled", "taskqueue": name, "priority": priority},
        )
        await asyncio.to_thread(
            self.kube.event,
            entry.body,
            "Scaled",
            f"{priority}: {current} -> {decision.replicas}; {decision.reason}",
        )

    async def _write_status(
        self,
        entry: Known,
        stats: dict[str, ClassStats],
        deployments: dict[str, Any],
        reachable: dict[str, Any],
        scaling: dict[str, Any],
    ) -> None:
        name = entry.body["metadata"]["name"]
        classes: dict[str, Any] = {}
        total_replicas = total_ready = 0
        for priority, row in stats.items():
            dep = deployments.get(deployment_name(name, priority))
            replicas = (dep.spec.replicas or 0) if dep else 0
            ready = (dep.status.ready_replicas or 0) if dep and dep.status else 0
            total_replicas += replicas
            total_ready += ready
            classes[priority] = {
                "ready": row.ready,
                "delayedDue": row.due_delayed,
                "delayedFuture": row.future_delayed,
                "inFlight": row.in_flight,
                "dead": row.dead,
                "backlog": row.backlog,
                "replicas": replicas,
                "readyReplicas": ready,
                **entry.class_status.get(priority, {}),
            }
        missing = [p for p in PRIORITY_CLASSES if deployment_name(name, p) not in deployments]
        ready_condition = (
            conditions.ready(False, "DeploymentsMissing", f"missing: {', '.join(missing)}")
            if missing
            else conditions.ready(True, "Reconciled", "all worker Deployments exist")
        )
        status = {
            "observedGeneration": entry.body["metadata"].get("generation"),
            "replicas": total_replicas,
            "readyReplicas": total_ready,
            "dead": sum(row.dead for row in stats.values()),
            "activeOperator": self.identity,
            "classes": classes,
            "conditions": conditions.merge(
                entry.last_status.get("conditions", []),
                reachable,
                ready_condition,
                scaling,
            ),
        }
        await self._patch_status(entry, status)

    async def _patch_status(self, entry: Known, status: dict[str, Any]) -> None:
        if status == entry.last_status or entry.gone:
            return
        meta = entry.body["metadata"]
        try:
            await asyncio.to_thread(self.kube.patch_status, meta["namespace"], meta["name"], status)
        except ApiException as exc:
            if exc.status != 404:
                raise
            # Deleted while this poll ran; its DELETED event removes it from the loop.
            return
        entry.last_status = status


def _scaling_condition(entry: Known) -> dict[str, Any]:
    if entry.conflicts:
        return conditions.scaling(
            False,
            "ConflictingAutoscaler",
            "; ".join(f"{p}: {other}" for p, other in sorted(entry.conflicts.items()))
            + "; replicas of these classes are left to the other autoscaler",
        )
    if entry.cost_forbidden:
        return conditions.scaling(
            True,
            "DeletionCostForbidden",
            f"{entry.cost_forbidden}; busy pods are not protected on scale-down",
        )
    return conditions.scaling(True, "Active", "autoscaler in control")


def _event_reason(outage: str) -> str:
    """The Event reason for a poll failure: a missing Secret is named as such (K02), every
    Redis fault shares one reason so that an outage is one aggregated Event (K06)."""
    return "SecretNotFound" if outage == "SecretNotFound" else "RedisUnreachable"
