"""The Conveyor operator as the e2e tier runs it, and the control plane it runs against.

``OperatorProcess`` starts ``python -m conveyor_operator`` exactly as ``Dockerfile.operator`` does,
with a TokenRequest token of the chart's ServiceAccount; ``ControlPlane`` is what the session's
``control_plane`` fixture (tests/e2e/conftest.py) hands every test. ``apply``, ``get_raw`` and
``helm`` talk to that control plane as a user would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes.client as k8s
import orjson
from kubernetes.client.exceptions import ApiException

from conveyor.local import free_port
from tests.support.k8s_cluster import K8sCluster, sa_username
from tests.support.workers import REPO_ROOT, wait_until

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


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """``wait_until`` at the pace of an API server: poll every ``every`` seconds."""
    return wait_until(probe, timeout, what, interval=every)


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


def crd_established(admin: k8s.ApiClient) -> bool:
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
        kubeconfig: Path | None = None,
    ) -> None:
        self.plane = plane
        self.kubeconfig = kubeconfig or plane.operator_kubeconfig
        """The chart's ServiceAccount token; a test may route it through a fault proxy."""
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
            KUBECONFIG=str(self.kubeconfig),
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
