"""One e2e test's view of the cluster: its namespace, queue, helpers and shadow workers.

The ``op`` fixture (tests/e2e/conftest.py) builds one ``E2E`` per test. Shadow workers stand in
for pods: for every kwok pod of a worker Deployment a real ``conveyor worker`` runs on the host
with ``POD_NAME`` set to the pod's name, so its busy/idle heartbeats in Redis are the ones the
operator ranks pods by; a pod's deletion sends SIGTERM to its worker.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import kubernetes.client as k8s
import redis
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from conveyor.job import JobSpec
from conveyor.local import RedisServer
from conveyor.queue import Queue
from tests.support.k8s_cluster import AuditEntry
from tests.support.operator_process import (
    CLASSES,
    DOWN_WINDOW,
    GROUP,
    OPERATOR_USER,
    PLURAL,
    POLL,
    SECRET,
    VERSION,
    ControlPlane,
    OperatorProcess,
    apply,
    get_raw,
    wait_for,
)
from tests.support.workers import REPO_ROOT, WorkerProcess, Workers


@dataclass(frozen=True)
class Event:
    name: str
    reason: str
    type: str
    note: str
    regarding: str
    created: float
    count: int
    """``series.count``, or 1 for an Event that never repeated."""

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Event:
        stamp = raw.get("eventTime") or raw["metadata"]["creationTimestamp"]
        return cls(
            name=raw["metadata"]["name"],
            reason=raw.get("reason", ""),
            type=raw.get("type", ""),
            note=raw.get("note", ""),
            regarding=(raw.get("regarding") or {}).get("name", ""),
            created=datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp(),
            count=int((raw.get("series") or {}).get("count", 1)),
        )


@dataclass
class History:
    """Every change of one Deployment's ``spec.replicas`` seen by a watch started at ``t0``."""

    entries: list[tuple[float, int, str, str]] = field(default_factory=list)
    """(time, spec.replicas, resourceVersion, manager of spec.replicas)."""

    def replicas(self) -> list[int]:
        out: list[int] = []
        for _, replicas, _, _ in self.entries:
            if not out or out[-1] != replicas:
                out.append(replicas)
        return out

    def first(self, predicate: Callable[[int], bool], after: float = 0.0) -> float | None:
        return next((t for t, r, _, _ in self.entries if t >= after and predicate(r)), None)

    def wait_first(
        self, predicate: Callable[[int], bool], after: float = 0.0, timeout: float = 10
    ) -> float:
        """When the watch first saw replicas satisfying ``predicate`` (it may lag a read)."""
        return wait_for(
            lambda: self.first(predicate, after), timeout, "the watch to see the change"
        )

    def changes(self) -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        for t, replicas, _, _ in self.entries:
            if not out or out[-1][1] != replicas:
                out.append((t, replicas))
        return out


def replicas_manager(dep: dict[str, Any]) -> str:
    for entry in dep["metadata"].get("managedFields") or ():
        spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if "f:replicas" in spec:
            return f"{entry.get('manager')}/{entry.get('subresource', '')}"
    return ""


class ShadowWorkers:
    """One real worker per live pod of a Deployment (see the module docstring)."""

    def __init__(
        self, test: E2E, deployment: str, priority: str, concurrency: int, log_dir: Path
    ) -> None:
        self.test = test
        self.selector = f"conveyor.dev/taskqueue={deployment.rsplit('-', 1)[0]}," + (
            f"conveyor.dev/class={priority}"
        )
        self.priority = priority
        self.concurrency = concurrency
        self.pool = Workers(test.redis_url, test.queue, f"ledger:{test.queue}", log_dir)
        self.by_pod: dict[str, WorkerProcess] = {}
        self.uids: dict[str, str] = {}
        self.kill_at: dict[str, float] = {}
        self.deleted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow-workers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.test.plane.cluster.api_client() as api:
            core = k8s.CoreV1Api(api)
            while not self._stop.wait(0.25):
                with contextlib.suppress(ApiException, OSError):
                    self._sync(core.list_namespaced_pod(self.test.ns, label_selector=self.selector))

    def _sync(self, pods: Any) -> None:
        live = set()
        for pod in pods.items:
            name = pod.metadata.name
            live.add(name)
            self.uids.setdefault(name, pod.metadata.uid)
            if pod.metadata.deletion_timestamp is not None:
                self._terminate(name, pod.metadata.deletion_grace_period_seconds or 0)
            elif name not in self.by_pod and pod.status.phase == "Running":
                self.by_pod[name] = self._spawn(name)
        for name in set(self.by_pod) - live:
            self._terminate(name, 0)
        now = time.monotonic()
        for name, when in list(self.kill_at.items()):
            if now >= when:
                self.by_pod[name].kill_everything()
                del self.kill_at[name]

    def _spawn(self, pod: str) -> WorkerProcess:
        env = self.pool.env(concurrency=self.concurrency, classes=self.priority)
        env.update(POD_NAME=pod, POD_NAMESPACE=self.test.ns)
        log_path = self.pool.directory / f"{pod}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "conveyor", "worker", "tests.support.tasks"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(pod, process, log_path)
        self.pool.started.append(worker)
        return worker

    def _terminate(self, pod: str, grace: float) -> None:
        worker = self.by_pod.get(pod)
        if worker is None or pod in self.deleted:
            return
        self.deleted.append(pod)
        if worker.process.poll() is None:
            worker.children()
            worker.signal(signal.SIGTERM)
            # As the kubelet: SIGKILL once the pod's grace period is over.
            self.kill_at[pod] = time.monotonic() + grace

    def heartbeating(self) -> set[str]:
        """Pods whose worker has published a heartbeat with its pod name."""
        client = self.test.redis
        keys = Queue(client, self.test.queue).keys
        found = set()
        for identity in cast(list[bytes], client.zrange(keys.workers, 0, -1)):
            pod = cast(bytes | None, client.hget(keys.worker(identity.decode()), "pod"))
            if pod:
                found.add(pod.decode())
        return found

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pool.stop_all()


class E2E:
    """One test's namespace, queue and helpers; built by the ``op`` fixture."""

    def __init__(
        self,
        plane: ControlPlane,
        operator: OperatorProcess,
        redis_server: RedisServer,
        tmp_path: Path,
    ) -> None:
        self.plane = plane
        self.cluster = plane.cluster
        self.api = plane.admin
        self.operator = operator
        self.apps = k8s.AppsV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)
        self.events_api = k8s.EventsV1Api(self.api)
        self.tmp_path = tmp_path
        self.ns = f"e2e-{uuid.uuid4().hex[:8]}"
        self.queue = f"q{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_server.url
        self.redis = redis.Redis(port=redis_server.port)
        self.jobs = Queue(self.redis, self.queue)
        self.t0 = time.time()
        self.log_from = len(operator.lines())
        self.namespaces = [self.ns]
        self.restarts_operator = False
        """Set by a test that stops or replaces the session operator on purpose."""
        self.forbidden_on_purpose: set[tuple[str, str]] = set()
        """(verb, resource) that a test revokes from the operator, so its 403s are expected."""
        self._closers: list[Callable[[], object]] = []
        self._threads: list[tuple[threading.Event, threading.Thread]] = []

    # -- objects -------------------------------------------------------------------------------

    def create_namespace(self, name: str | None = None) -> str:
        name = name or self.ns
        if name not in self.namespaces:
            self.namespaces.append(name)
        apply(self.api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_for(lambda: self._has_default_sa(name), 30, f"the default ServiceAccount in {name}")
        return name

    def _has_default_sa(self, ns: str) -> bool:
        try:
            self.core.read_namespaced_service_account("default", ns)
        except ApiException:
            return False
        return True

    def secret(
        self, url: str | None = None, ns: str | None = None, name: str = SECRET, **extra: str
    ) -> None:
        apply(
            self.api,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name},
                "stringData": {"url": url or self.redis_url, **extra},
            },
            ns or self.ns,
        )

    def taskqueue(
        self,
        name: str = "tq",
        *,
        classes: Mapping[str, Mapping[str, Any]] | None = None,
        scaling: Mapping[str, Any] | None = None,
        worker: Mapping[str, Any] | None = None,
        queue: str | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        """A TaskQueue manifest with the tier's fast defaults; arguments override them."""
        base_class = {"minReplicas": 0, "maxReplicas": 10, "targetBacklogPerReplica": 10}
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TaskQueue",
            "metadata": {"name": name},
            "spec": {
                "queue": queue or self.queue,
                "redis": {"secretRef": {"name": SECRET}},
                "worker": {
                    "image": "registry.example/conveyor-worker:e2e",
                    "modules": ["tests.support.tasks"],
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                    **(worker or {}),
                },
                "classes": {p: {**base_class, **(classes or {}).get(p, {})} for p in CLASSES},
                "scaling": {
                    "pollIntervalSeconds": POLL,
                    "scaleDownStabilizationSeconds": DOWN_WINDOW,
                    **(scaling or {}),
                },
                "drain": {"graceSeconds": 5},
                **spec,
            },
        }

    def apply_tq(self, body: Mapping[str, Any], ns: str | None = None) -> dict[str, Any]:
        return apply(self.api, body, ns or self.ns)

    def get_tq(self, name: str = "tq", ns: str | None = None) -> dict[str, Any]:
        return dict(
            self.custom.get_namespaced_custom_object(GROUP, VERSION, ns or self.ns, PLURAL, name)
        )

    def status(self, name: str = "tq", ns: str | None = None) -> dict[str, Any]:
        return dict(self.get_tq(name, ns).get("status") or {})

    def condition(self, kind: str, name: str = "tq", ns: str | None = None) -> dict[str, Any]:
        conditions = self.status(name, ns).get("conditions") or []
        return next((c for c in conditions if c["type"] == kind), {})

    def deployments(self, tq: str = "tq", ns: str | None = None) -> dict[str, Any]:
        items = self.apps.list_namespaced_deployment(
            ns or self.ns, label_selector=f"conveyor.dev/taskqueue={tq}"
        ).items
        return {d.metadata.name: d for d in items}

    def wait_deployments(
        self, tq: str = "tq", ns: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        def complete() -> dict[str, Any] | None:
            found = self.deployments(tq, ns)
            return found if len(found) == len(CLASSES) else None

        return wait_for(complete, timeout, f"the 4 worker Deployments of {tq}")

    def deployment_dict(self, name: str, ns: str | None = None) -> dict[str, Any]:
        dep = self.apps.read_namespaced_deployment(name, ns or self.ns)
        return dict(self.api.sanitize_for_serialization(dep))

    def scale(self, deployment: str, ns: str | None = None) -> int:
        return int(
            self.apps.read_namespaced_deployment_scale(deployment, ns or self.ns).spec.replicas or 0
        )

    def wait_scale(
        self,
        deployment: str,
        want: Callable[[int], bool] | int,
        timeout: float,
        ns: str | None = None,
    ) -> int:
        check = want if callable(want) else (lambda r: r == want)
        seen: list[int] = []

        def probe() -> bool:
            seen.append(self.scale(deployment, ns))
            return check(seen[-1])

        wait_for(probe, timeout, f"{deployment} replicas to satisfy {want}", every=0.05)
        return seen[-1]

    def events(
        self, reason: str | None = None, ns: str | None = None, name: str | None = None
    ) -> list[Event]:
        """``events.k8s.io/v1`` Events, read raw: the client's model rejects the ones that
        controllers post through ``core/v1`` (no ``eventTime``)."""
        listing = get_raw(self.api, f"/apis/events.k8s.io/v1/namespaces/{ns or self.ns}/events")
        events = [Event.parse(item) for item in listing["items"]]
        return [
            e
            for e in events
            if (reason is None or e.reason == reason) and (name is None or e.regarding == name)
        ]

    def pods(self, deployment: str, ns: str | None = None) -> list[Any]:
        tq, priority = deployment.rsplit("-", 1)
        return list(
            self.core.list_namespaced_pod(
                ns or self.ns,
                label_selector=f"conveyor.dev/taskqueue={tq},conveyor.dev/class={priority}",
            ).items
        )

    # -- Redis ---------------------------------------------------------------------------------

    def enqueue(
        self,
        n: int,
        priority: str,
        job_type: str = "sleep",
        queue: Queue | None = None,
        **options: Any,
    ) -> float:
        """Enqueue ``n`` jobs; returns Redis ``TIME`` right after, the start of a reaction."""
        payload = options.pop("payload", {"seconds": 0.1})
        target = queue or self.jobs
        target.enqueue_many(
            JobSpec(job_type, payload, priority=priority, **options) for _ in range(n)
        )
        seconds, micros = target.client.time()
        return float(seconds) + micros / 1e6

    # -- audit ---------------------------------------------------------------------------------

    def op_audit(self, since: float | None = None, **filters: Any) -> list[AuditEntry]:
        """The operator's own requests since ``since`` (default: the test's start)."""
        return self.cluster.audit(user=OPERATOR_USER, since=since or self.t0, **filters)

    def scale_writes(self, deployment: str, since: float | None = None) -> list[AuditEntry]:
        return [
            e
            for e in self.op_audit(since, resource="deployments", subresource="scale")
            if e.verb in ("patch", "update") and e.name == deployment and e.namespace == self.ns
        ]

    # -- watchers and workers ------------------------------------------------------------------

    def history(self, deployment: str, ns: str | None = None) -> History:
        """Start recording ``deployment``'s replicas now (a watch, as the cases' ``history``)."""
        record = History()
        stop = threading.Event()
        namespace = ns or self.ns
        started = threading.Event()

        def run() -> None:
            with self.cluster.api_client() as api:
                apps = k8s.AppsV1Api(api)
                version = None
                while not stop.is_set():
                    try:
                        listing = apps.list_namespaced_deployment(
                            namespace, field_selector=f"metadata.name={deployment}"
                        )
                        version = listing.metadata.resource_version
                        for dep in listing.items:
                            self._record(record, api, dep)
                        started.set()
                        stream = watch.Watch().stream(
                            apps.list_namespaced_deployment,
                            namespace,
                            field_selector=f"metadata.name={deployment}",
                            resource_version=version,
                            timeout_seconds=2,
                        )
                        for event in stream:
                            if event["type"] in ("ADDED", "MODIFIED"):
                                self._record(record, api, event["object"])
                            if stop.is_set():
                                break
                    except (ApiException, OSError):
                        time.sleep(0.2)

        self.background(run, stop, f"history-{deployment}")
        started.wait(10)
        return record

    @staticmethod
    def _record(record: History, api: k8s.ApiClient, dep: Any) -> None:
        body = api.sanitize_for_serialization(dep)
        replicas = int(body["spec"].get("replicas", 0))
        version = body["metadata"]["resourceVersion"]
        if record.entries and record.entries[-1][2] == version:
            return
        record.entries.append((time.time(), replicas, version, replicas_manager(body)))

    def watch_backlog(self, priority: str, queue: Queue | None = None) -> list[tuple[float, int]]:
        """Sample ``priority``'s backlog (ready + due + in flight) every 50 ms from now on."""
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        jobs = queue or self.jobs

        def run() -> None:
            while not stop.wait(0.05):
                with contextlib.suppress(redis.RedisError):
                    row = next(r for r in jobs.stats([priority]) if r.priority == priority)
                    samples.append((time.time(), row.backlog))

        self.background(run, stop, f"backlog-{priority}")
        return samples

    def workers(self, priority: str, concurrency: int = 4) -> Workers:
        """A pool of plain workers (no pod) for ``priority``; stopped when the test ends."""
        directory = self.tmp_path / f"workers-{priority}"
        directory.mkdir(exist_ok=True)
        pool = Workers(self.redis_url, self.queue, f"ledger:{self.queue}", directory)
        self._closers.append(pool.stop_all)
        pool.start(classes=priority, concurrency=concurrency)
        return pool

    def shadow_workers(self, deployment: str, priority: str, concurrency: int = 1) -> ShadowWorkers:
        directory = self.tmp_path / f"shadow-{deployment}"
        directory.mkdir(exist_ok=True)
        shadows = ShadowWorkers(self, deployment, priority, concurrency, directory)
        self._closers.append(shadows.stop)
        return shadows

    def on_teardown(self, closer: Callable[[], object]) -> None:
        self._closers.append(closer)

    def background(self, target: Callable[[], None], stop: threading.Event, name: str) -> None:
        """Run ``target`` in a thread until the test ends; it must return soon after ``stop``."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append((stop, thread))

    def close(self) -> None:
        # Every watcher is told first, so their stream timeouts run out together.
        for stop, _ in self._threads:
            stop.set()
        for _, thread in self._threads:
            thread.join(10)
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self.redis.close()
