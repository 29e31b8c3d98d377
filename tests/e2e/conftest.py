"""The ``k8s-api`` tier: Conveyor's operator against a real local control plane.

One control plane (``tests.support.k8s_cluster``), one private Redis and one operator process
serve the whole session. The operator runs exactly as ``Dockerfile.operator`` starts it
(``python -m conveyor_operator``), with a TokenRequest token of the chart's ServiceAccount bound
to the RBAC that ``helm template`` renders from ``charts/conveyor``: every test therefore also
exercises the chart's permissions, and the audit log tells the operator's requests apart.

Each test gets its own namespace, Redis queue and Secret through the ``op`` fixture. When a test
ends, the fixture fails it if the operator received any 403 (K12), logged a traceback or the
"Patching failed with inconsistencies" warning (K09), or died. The binaries come from
``scripts/k8s/build-bins.sh``; a failed build errors every test of the tier, it never skips.

Shadow workers stand in for pods: for every kwok pod of a worker Deployment a real ``conveyor
worker`` runs on the host with ``POD_NAME`` set to the pod's name, so its busy/idle heartbeats
in Redis are the ones the operator ranks pods by; a pod's deletion sends SIGTERM to its worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import kubernetes.client as k8s
import orjson
import pytest
import redis
import yaml
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from conveyor.job import JobSpec
from conveyor.local import RedisServer, free_port
from conveyor.queue import Queue
from tests.support.k8s_cluster import AuditEntry, K8sCluster, find_bin_dir, sa_username
from tests.support.workers import REPO_ROOT, WorkerProcess, Workers

T = TypeVar("T")

GROUP, VERSION, PLURAL = "conveyor.dev", "v1alpha1", "taskqueues"
CLASSES = ("critical", "high", "normal", "low")
RELEASE = "conveyor"
OPERATOR_NAMESPACE = "conveyor-system"
OPERATOR_SA = f"{RELEASE}-operator"
OPERATOR_USER = sa_username(OPERATOR_NAMESPACE, OPERATOR_SA)
POLL = 1.0
"""Poll interval of every test TaskQueue (the cases' 2 s, halved to keep the tier short)."""
DOWN_WINDOW = 5
"""Default scale-down stabilization window of test TaskQueues, in seconds."""
SECRET = "redis-creds"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
CRD_PATH = REPO_ROOT / "crds" / "taskqueue.yaml"
CHART = REPO_ROOT / "charts" / "conveyor"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
LOG_PROBLEMS = ("Traceback (most recent call last)", "Patching failed with inconsistencies")


TIMINGS_FILE = REPO_ROOT / "test-artifacts" / "operator-reaction-times.json"
_timings: dict[str, list[float]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "k8s_api: runs against the local Kubernetes control plane")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _timings:
        TIMINGS_FILE.parent.mkdir(exist_ok=True)
        TIMINGS_FILE.write_text(json.dumps(_timings, indent=2, sort_keys=True) + "\n")


def record_timing(name: str, seconds: float) -> None:
    """Keep a measured reaction time for the report (``test-artifacts/``) and the test log."""
    _timings.setdefault(name, []).append(round(seconds, 3))
    print(f"timing {name}: {seconds:.2f}s")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# -- applying manifests ------------------------------------------------------------------------

_PLURALS = {
    "Namespace": ("namespaces", False),
    "ServiceAccount": ("serviceaccounts", True),
    "Secret": ("secrets", True),
    "ClusterRole": ("clusterroles", False),
    "ClusterRoleBinding": ("clusterrolebindings", False),
    "Role": ("roles", True),
    "RoleBinding": ("rolebindings", True),
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "TaskQueue": (PLURAL, True),
}


def apply(
    api: k8s.ApiClient, doc: Mapping[str, Any], namespace: str | None = None
) -> dict[str, Any]:
    """Server-side apply of one manifest (what ``kubectl apply --server-side`` sends)."""
    kind = doc["kind"]
    plural, namespaced = _PLURALS[kind]
    version = doc["apiVersion"]
    base = f"/api/{version}" if "/" not in version else f"/apis/{version}"
    ns = namespace or doc.get("metadata", {}).get("namespace")
    where = f"/namespaces/{ns}" if namespaced else ""
    body = dict(doc)
    if namespaced:
        body["metadata"] = {**doc["metadata"], "namespace": ns}
    path = f"{api.configuration.host}{base}{where}/{plural}/{doc['metadata']['name']}"
    response = api.call_api(
        "PATCH",
        f"{path}?fieldManager=e2e-apply&force=true&fieldValidation=Strict",
        header_params={
            "Content-Type": "application/apply-patch+yaml",
            "Accept": "application/json",
        },
        body=orjson.dumps(body).decode(),
    )
    response.read()
    if not 200 <= response.status < 300:
        raise ApiException(status=response.status, reason=response.reason, body=response.data)
    return dict(orjson.loads(response.data))


def get_raw(
    api: k8s.ApiClient, path: str, accept: str = "application/json", **headers: str
) -> dict[str, Any]:
    """GET with the admin's client certificate and any ``headers`` (e.g. impersonation)."""
    response = api.call_api(
        "GET", f"{api.configuration.host}{path}", header_params={"Accept": accept, **headers}
    )
    response.read()
    if response.status != 200:
        raise ApiException(status=response.status, reason=response.reason, body=response.data)
    return dict(orjson.loads(response.data))


def helm(cluster: K8sCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.bin_dir / "helm"), *args],
        env=cluster.env(),
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


# -- the control plane ---------------------------------------------------------------------------


@dataclass
class ControlPlane:
    cluster: K8sCluster
    admin: k8s.ApiClient
    rbac: list[dict[str, Any]]
    """The RBAC objects ``helm template`` rendered, as applied."""
    operator_kubeconfig: Path


_built: list[Path | BaseException] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The build runs here, before any test starts its timeout: cold, it takes tens of minutes
    # (warm, well under a second). Only when a selected test needs the control plane.
    if _built or not any("control_plane" in getattr(i, "fixturenames", ()) for i in items):
        return
    try:
        _built.append(find_bin_dir(build=True))
    except (FileNotFoundError, OSError) as exc:
        _built.append(exc)


@pytest.fixture(scope="session")
def k8s_bin_dir() -> Path:
    # A failed build errors every test of the tier: never a skip, which would pass on nothing.
    if not _built:
        _built.append(find_bin_dir(build=True))
    found = _built[0]
    if isinstance(found, BaseException):
        raise found
    return found


@pytest.fixture(scope="session")
def control_plane(k8s_bin_dir: Path) -> Iterator[ControlPlane]:
    # The HPA controller's default 15 s sync would make K07's conflict test slow.
    extra = {"kube-controller-manager": ["--horizontal-pod-autoscaler-sync-period=2s"]}
    with K8sCluster(k8s_bin_dir, extra_args=extra) as cluster, cluster.api_client() as admin:
        for doc in yaml.safe_load_all(CRD_PATH.read_text()):
            apply(admin, doc)
        wait_for(lambda: _crd_established(admin), 30, "the TaskQueue CRD to be Established")
        apply(
            admin,
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "conveyor-system"}},
        )
        rendered = helm(cluster, "template", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE)
        rbac = [d for d in yaml.safe_load_all(rendered.stdout) if d and d.get("kind") in RBAC_KINDS]
        assert {d["kind"] for d in rbac} == set(RBAC_KINDS), rendered.stdout
        for doc in rbac:
            apply(admin, doc, OPERATOR_NAMESPACE)
        kubeconfig = cluster.service_account_kubeconfig(
            OPERATOR_NAMESPACE, OPERATOR_SA, expiration_seconds=4 * 3600, create=False
        )
        yield ControlPlane(cluster, admin, rbac, kubeconfig)


def _crd_established(admin: k8s.ApiClient) -> bool:
    crd = k8s.ApiextensionsV1Api(admin).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or ())


# -- the operator process ------------------------------------------------------------------------


class OperatorProcess:
    """One ``python -m conveyor_operator`` with the chart's ServiceAccount credentials."""

    def __init__(
        self,
        plane: ControlPlane,
        log_dir: Path,
        identity: str,
        *,
        lease_duration: float = 15.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.plane = plane
        self.identity = identity
        self.log_path = log_dir / f"operator-{identity}.log"
        self.lease_duration = lease_duration
        self.extra_env = dict(extra_env or {})
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> OperatorProcess:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEYOR_", "KUBE"))}
        env.update(
            KUBECONFIG=str(self.plane.operator_kubeconfig),
            POD_NAME=self.identity,
            POD_NAMESPACE=OPERATOR_NAMESPACE,
            CONVEYOR_OPERATOR_HEALTH_PORT=str(self.port),
            CONVEYOR_OPERATOR_HEALTH_HOST="127.0.0.1",
            CONVEYOR_OPERATOR_LEASE_DURATION=str(self.lease_duration),
            CONVEYOR_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
            **self.extra_env,
        )
        self.started_at = time.time()
        with self.log_path.open("ab") as log:
            # The exact entrypoint of Dockerfile.operator, in its own session like PID 1.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "conveyor_operator"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def probe(self, path: str) -> int:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.port}{path}", timeout=3) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)
        except OSError:
            return 0

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the operator's /metrics, or None if it has none yet."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        wanted = {f'{k}="{v}"' for k, v in labels.items()}
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, value = line.rsplit(" ", 1)
            found = set(head[len(name) :].strip("{}").split(",")) if "{" in head else set()
            if wanted <= found:
                return float(value)
        return None

    def wait_serving(self, timeout: float = 60) -> OperatorProcess:
        """Until this process leads and its TaskQueue and Deployment watches are open."""
        since = self.started_at

        def serving() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"operator exited {self.process.returncode}:\n{self.tail()}")
            if not self.log(event="leading"):
                return False
            watches = {
                e.resource
                for e in self.plane.cluster.audit(
                    user=OPERATOR_USER, verb="watch", since=since, stage=None
                )
            }
            return {PLURAL, "deployments"} <= watches

        wait_for(serving, timeout, f"operator {self.identity} to lead and watch", every=0.2)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process and wait for it; SIGKILL if it outlives ``timeout``."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"operator ignored signal {sig} for {timeout}s") from None
        return self.process.returncode

    def lines(self) -> list[bytes]:
        try:
            return self.log_path.read_bytes().splitlines()
        except FileNotFoundError:
            return []

    def log(self, since_line: int = 0, **match: Any) -> list[dict[str, Any]]:
        """JSON log entries from line ``since_line`` on whose fields equal ``match``."""
        out = []
        for line in self.lines()[since_line:]:
            if not line.startswith(b"{"):
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if all(entry.get(k) == v for k, v in match.items()):
                    out.append(entry)
        return out

    def problems(self, since_line: int = 0) -> list[str]:
        """Tracebacks (logged or raw) and Kopf's lost-patch warning since ``since_line``."""
        found = []
        for line in self.lines()[since_line:]:
            text = line.decode(errors="replace")
            if any(p in text for p in LOG_PROBLEMS) or '"exception":' in text:
                found.append(text[:2000])
        return found

    def tail(self, n: int = 60) -> str:
        return "\n".join(line.decode(errors="replace")[:600] for line in self.lines()[-n:])


@pytest.fixture(scope="session")
def operator_process(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log_dir = tmp_path_factory.mktemp("operator")
    operator = OperatorProcess(control_plane, log_dir, "op-main").start().wait_serving()
    yield operator
    if operator.running():
        operator.stop()


# -- per test ----------------------------------------------------------------------------------


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


@pytest.fixture
def op(
    control_plane: ControlPlane,
    operator_process: OperatorProcess,
    redis_server: RedisServer,
    tmp_path: Path,
) -> Iterator[E2E]:
    """A namespace with the Redis Secret, the running session operator and the test's checks."""
    if not operator_process.running():
        operator_process.start().wait_serving()
    test = E2E(control_plane, operator_process, redis_server, tmp_path)
    test.create_namespace()
    test.secret()
    pid = operator_process.pid
    try:
        yield test
    finally:
        test.close()
    forbidden = [
        e for e in test.op_audit(code=403) if (e.verb, e.resource) not in test.forbidden_on_purpose
    ]
    problems = operator_process.problems(test.log_from)
    _delete_test_namespaces(test)
    if not test.restarts_operator:
        assert operator_process.running(), f"the operator died:\n{operator_process.tail()}"
        assert operator_process.pid == pid, "the operator was restarted behind the test's back"
    assert not forbidden, "the operator got 403s (K12): " + "; ".join(
        f"{e.verb} {e.resource}/{e.subresource or ''} in {e.namespace}" for e in forbidden
    )
    assert not problems, "the operator logged problems:\n" + "\n".join(problems)


def _delete_test_namespaces(test: E2E) -> None:
    # TaskQueues go first, so the operator forgets them before their Deployments disappear
    # with the namespace; nobody waits for the namespace itself.
    for ns in test.namespaces:
        with contextlib.suppress(ApiException):
            for tq in test.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)[
                "items"
            ]:
                test.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, tq["metadata"]["name"]
                )
    for ns in test.namespaces:
        with contextlib.suppress(ApiException):
            test.core.delete_namespace(ns)
