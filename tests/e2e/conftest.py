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
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from conveyor.local import RedisServer
from tests.support.k8s_cluster import K8sCluster, find_bin_dir
from tests.support.operator_e2e import E2E, Event, History, ShadowWorkers, replicas_manager
from tests.support.operator_process import (
    CHART,
    CLASSES,
    CRD_PATH,
    DELETION_COST,
    DOWN_WINDOW,
    GROUP,
    OPERATOR_NAMESPACE,
    OPERATOR_SA,
    OPERATOR_USER,
    PLURAL,
    POLL,
    RBAC_KINDS,
    RELEASE,
    SECRET,
    VERSION,
    ControlPlane,
    OperatorProcess,
    apply,
    crd_established,
    get_raw,
    helm,
    wait_for,
)
from tests.support.workers import REPO_ROOT

# The tier's tests import these from here.
__all__ = [
    "CHART",
    "CLASSES",
    "DELETION_COST",
    "DOWN_WINDOW",
    "E2E",
    "GROUP",
    "OPERATOR_NAMESPACE",
    "OPERATOR_SA",
    "OPERATOR_USER",
    "PLURAL",
    "POLL",
    "REPO_ROOT",
    "SECRET",
    "VERSION",
    "Event",
    "History",
    "OperatorProcess",
    "ShadowWorkers",
    "apply",
    "get_raw",
    "helm",
    "record_timing",
    "replicas_manager",
    "wait_for",
]

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


# -- the control plane ---------------------------------------------------------------------------


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
        wait_for(lambda: crd_established(admin), 30, "the TaskQueue CRD to be Established")
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


# -- the operator process ------------------------------------------------------------------------


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
