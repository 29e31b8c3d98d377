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

from redis.typing import EncodableT, FieldT

from conveyor.errors import ConfigError
from conveyor.keys import PRIORITY_CLASSES, Keyspace
from conveyor.queue import ClassStats
from conveyor.schedule import Scheduler
from conveyor_operator import conditions
from conveyor_operator.autoscale import Backlog, Decision, Recommendations, decide
from conveyor_operator.backlog import BacklogReader, BacklogUnavailable, RedisTarget
from conveyor_operator.deletion_cost import annotate_for_scale_down
from conveyor_operator.kube import Kube, now
from conveyor_operator.manifests import deployment_name
from conveyor_operator.metrics import LAST_POLL, POLL_ERRORS, SCALE_WRITES
from conveyor_operator.spec import TaskQueueSpec, parse, rate_limits, schedules_of

log = logging.getLogger(__name__)
SECRET_BACKOFF_CAP = 30.0


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
        self.known.pop((namespace, name), None)

    async def run(self) -> None:
        while True:
            due = [k for k in self.known.values() if k.next_poll <= time.monotonic()]
            for entry in due:
                entry.next_poll = time.monotonic() + entry.spec.poll_interval
                try:
                    await self.poll(entry)
                except Exception:
                    meta = entry.body["metadata"]
                    log.exception(
                        "poll of %s/%s failed",
                        meta["namespace"],
                        meta["name"],
                        extra={"event": "poll_failed"},
                    )
            await asyncio.sleep(0.2)

    async def poll(self, entry: Known) -> None:
        meta = entry.body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        target = await self._target(entry)
        if target is None:
            return
        try:
            stats = await self.reader.read(target)
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
            self.kube.end_series(namespace, name, "RedisUnreachable")
            entry.outage = None
        await self._sync_queue(entry, target)
        deployments = await asyncio.to_thread(self.kube.deployments, namespace, name)
        for priority in PRIORITY_CLASSES:
            dep = deployments.get(deployment_name(name, priority))
            if dep is not None:
                await self._scale_class(entry, priority, dep, stats[priority], target)
        await self._write_status(
            entry, stats, deployments, conditions.reachable(True, "Polled", "backlog read")
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
        await asyncio.to_thread(
            self.kube.event,
            entry.body,
            "RedisUnreachable",
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
        self, entry: Known, priority: str, dep: Any, stats: ClassStats, target: RedisTarget
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
        backlog = Backlog(stats.ready, stats.due_delayed, stats.in_flight)
        decision = decide(policy, backlog, current, history, time.monotonic())
        if entry.spec.paused:
            decision = Decision(0, 0, "TaskQueue is paused")
        class_status = entry.class_status.setdefault(priority, {})
        class_status["desiredReplicas"] = decision.replicas
        if not decision.changes(current):
            entry.written.setdefault(priority, current)
            return
        if decision.replicas < current:
            await annotate_for_scale_down(self.kube, self.reader, target, namespace, dep)
        await asyncio.to_thread(self.kube.scale, namespace, dep.metadata.name, decision.replicas)
        SCALE_WRITES.labels(namespace, name, priority).inc()
        entry.written[priority] = decision.replicas
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
                conditions.scaling(True, "Active", "autoscaler in control"),
            ),
        }
        await self._patch_status(entry, status)

    async def _patch_status(self, entry: Known, status: dict[str, Any]) -> None:
        if status == entry.last_status:
            return
        meta = entry.body["metadata"]
        await asyncio.to_thread(self.kube.patch_status, meta["namespace"], meta["name"], status)
        entry.last_status = status
