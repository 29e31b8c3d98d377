"""A real local Kubernetes control plane for tests, with fake nodes and no containers.

It runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (which plays the
kubelet for two fake nodes, ``node-a`` and ``node-b``) as child processes bound to 127.0.0.1, from
binaries built by ``scripts/k8s/build-bins.sh``. Deployments get ReplicaSets and Pods, the Pods
are scheduled and kwok marks them Running and Ready; nothing is ever executed inside them.

Typical use, e.g. from a session-scoped pytest fixture::

    with K8sCluster(find_bin_dir()) as cluster:
        with cluster.api_client() as api:
            kubernetes.client.AppsV1Api(api).create_namespaced_deployment(...)
        op_kubeconfig = cluster.service_account_kubeconfig("conveyor-system", "conveyor-operator")
        writes = cluster.audit(user=sa_username("conveyor-system", "conveyor-operator"),
                               verb="patch", resource="deployments", subresource="scale")
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import datetime as dt
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

import kubernetes.client as k8s
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes.client.exceptions import ApiException

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
BUILD_SCRIPT: Final = REPO_ROOT / "scripts" / "k8s" / "build-bins.sh"
REQUIRED_BINARIES: Final = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
)
KWOK_STAGES: Final = "kwok-stages.yaml"

DEFAULT_NODES: Final = ("node-a", "node-b")
# Only what Conveyor's operator tests lean on, to keep CPU and RSS down; IPAM, PV and CSR
# controllers have nothing to act on without kubelets.
DEFAULT_CONTROLLERS: Final = (
    # The NodeTaint admission plugin gives every new node a not-ready NoSchedule taint; only
    # this controller lifts it once kwok reports the node Ready.
    "node-lifecycle-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "pod-garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "job-controller",
    "disruption-controller",
    "horizontal-pod-autoscaler-controller",
    "clusterrole-aggregation-controller",
    "root-ca-certificate-publisher-controller",
)
# Static bearer tokens (--token-auth-file) for tests that act as a plain human user.
DEFAULT_STATIC_USERS: Final[Mapping[str, Sequence[str]]] = {
    "test-admin": ("system:masters",),
    "test-user": (),
}
SERVICE_CIDR: Final = "10.0.0.0/24"
SA_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"

_PR_SET_PDEATHSIG: Final = 1
_CONTEXT: Final = "conveyor-harness"


class ClusterError(RuntimeError):
    """The control plane failed to start or a component died; the message holds log tails."""


def sa_username(namespace: str, name: str) -> str:
    """The username the apiserver (and so the audit log) gives a ServiceAccount's tokens."""
    return f"system:serviceaccount:{namespace}:{name}"


def find_bin_dir(*, build: bool = True) -> Path:
    """Locate the binaries; with ``build`` run the (idempotent, cached) build script if needed.

    A cold build takes tens of minutes, so CI should run the script before pytest and export
    ``CONVEYOR_K8S_BIN``; from a warm cache the script returns in well under a second. Without
    ``build`` a missing cache raises FileNotFoundError instead of building.
    """
    env = os.environ.get("CONVEYOR_K8S_BIN")
    if env and _missing_binaries(Path(env)) == []:
        return Path(env)
    args = ["bash", str(BUILD_SCRIPT)] if build else ["bash", str(BUILD_SCRIPT), "--check"]
    proc = subprocess.run(args, check=False, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise FileNotFoundError(
            f"Kubernetes test binaries not available ({' '.join(args)} exited "
            f"{proc.returncode}); run {BUILD_SCRIPT}"
        )
    return Path(lines[-1])


@contextlib.contextmanager
def use_kubeconfig(path: Path | str) -> Iterator[None]:
    """Point ``$KUBECONFIG`` and the kubernetes client's default at ``path`` inside the block.

    The kubernetes package reads $KUBECONFIG once, at import, so Kopf's default login (which
    piggybacks on that package) ignores a KUBECONFIG that a test sets later; patch both.
    """
    from kubernetes.config import kube_config

    old_env = os.environ.get("KUBECONFIG")
    old_default = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    os.environ["KUBECONFIG"] = str(path)
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    try:
        yield
    finally:
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old_default
        if old_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old_env


def _missing_binaries(bin_dir: Path) -> list[str]:
    names = [*REQUIRED_BINARIES, KWOK_STAGES]
    return [n for n in names if not (bin_dir / n).is_file()]


@dataclass(frozen=True)
class AuditEntry:
    """One line of the apiserver's JSON audit log (policy level Metadata)."""

    received: dt.datetime
    stage: str
    user: str
    groups: tuple[str, ...]
    verb: str
    api_group: str
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    code: int | None
    uri: str
    user_agent: str
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, event: Mapping[str, Any]) -> AuditEntry:
        ref: Mapping[str, Any] = event.get("objectRef") or {}
        user: Mapping[str, Any] = event.get("user") or {}
        status: Mapping[str, Any] = event.get("responseStatus") or {}
        code = status.get("code")
        return cls(
            received=dt.datetime.fromisoformat(str(event["requestReceivedTimestamp"])),
            stage=str(event.get("stage", "")),
            user=str(user.get("username", "")),
            groups=tuple(str(g) for g in user.get("groups") or ()),
            verb=str(event.get("verb", "")),
            api_group=str(ref.get("apiGroup", "")),
            resource=ref.get("resource"),
            subresource=ref.get("subresource"),
            namespace=ref.get("namespace"),
            name=ref.get("name"),
            code=int(code) if code is not None else None,
            uri=str(event.get("requestURI", "")),
            user_agent=str(event.get("userAgent", "")),
            raw=event,
        )


class _AuditLog:
    """Incremental, thread-safe reader: tests poll it often and the log only grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._entries: list[AuditEntry] = []
        self._lock = threading.Lock()

    def entries(self) -> list[AuditEntry]:
        with self._lock:
            try:
                with self.path.open("rb") as f:
                    f.seek(self._offset)
                    chunk = f.read()
            except FileNotFoundError:
                return list(self._entries)
            # The apiserver may be half-way through a line; leave that for the next read.
            end = chunk.rfind(b"\n") + 1
            self._offset += end
            for line in chunk[:end].splitlines():
                if line.strip():
                    self._entries.append(AuditEntry.parse(json.loads(line)))
            return list(self._entries)


class _CertAuthority:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "conveyor-harness-ca")])
        self.cert = (
            self._builder(name, self.key.public_key())
            .issuer_name(name)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @staticmethod
    def _builder(
        subject: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        # Backdated so a test host whose clock is slightly behind still accepts the certs.
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=7))
        )

    def issue(
        self,
        common_name: str,
        organizations: Sequence[str] = (),
        *,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> tuple[bytes, bytes]:
        """Returns (cert PEM, key PEM): a server cert if any SAN is given, else a client cert."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        server = bool(dns_names or ip_addresses)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(x509.Name(attrs), key.public_key())
            .issuer_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open together so the kernel cannot hand out the same port twice.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Makes children die with the test process even if it is SIGKILLed (CI timeouts).

    The kernel ties the signal to the thread that forked, so only the main thread uses it;
    children started from a short-lived thread would otherwise die with that thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill)

    return preexec


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


class K8sCluster:
    """Starts and stops one control plane; use as a context manager or call start()/stop().

    Attributes set by start(): ``server`` (https URL), ``kubeconfig`` (admin, system:masters),
    ``ca_file``, ``audit_log``, ``log_dir``, ``pids`` and ``start_seconds``.
    Set ``CONVEYOR_K8S_KEEP=1`` (or ``keep_dir=True``) to keep the work dir for post-mortems.
    """

    def __init__(
        self,
        bin_dir: Path | str,
        *,
        nodes: Sequence[str] = DEFAULT_NODES,
        controllers: Sequence[str] = DEFAULT_CONTROLLERS,
        static_users: Mapping[str, Sequence[str]] = DEFAULT_STATIC_USERS,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        work_dir: Path | str | None = None,
        keep_dir: bool | None = None,
        start_timeout: float = 180.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.bin_dir = Path(bin_dir).resolve()
        missing = _missing_binaries(self.bin_dir)
        if missing:
            raise FileNotFoundError(
                f"{self.bin_dir} lacks {', '.join(missing)}; run {BUILD_SCRIPT}"
            )
        self.nodes = tuple(nodes)
        self.controllers = tuple(controllers)
        self.extra_args = {k: tuple(v) for k, v in (extra_args or {}).items()}
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._requested_dir = Path(work_dir) if work_dir is not None else None
        # A caller-supplied work_dir belongs to the caller and is never deleted.
        self.keep_dir = (
            keep_dir
            if keep_dir is not None
            else work_dir is not None or os.environ.get("CONVEYOR_K8S_KEEP") == "1"
        )
        self.static_tokens = {user: secrets.token_hex(24) for user in static_users}
        self._static_groups = {user: tuple(groups) for user, groups in static_users.items()}

        self._procs: list[_Proc] = []
        self._lock = threading.Lock()
        self._started = False
        self.work_dir = Path()
        self.log_dir = Path()
        self.pki_dir = Path()
        self.ca_file = Path()
        self.kubeconfig = Path()
        self.audit_log = Path()
        self.server = ""
        self.api_port = 0
        self.etcd_url = ""
        self.start_seconds = 0.0
        self._audit: _AuditLog | None = None
        self._ca: _CertAuthority | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        if self._started:
            raise RuntimeError("cluster already started")
        self._started = True
        t0 = time.monotonic()
        if self._requested_dir is not None:
            self._requested_dir.mkdir(parents=True, exist_ok=True)
            self.work_dir = self._requested_dir.resolve()
        else:
            self.work_dir = Path(tempfile.mkdtemp(prefix="conveyor-k8s-"))
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        atexit.register(self.stop)
        try:
            self._start_all(time.monotonic() + self.start_timeout)
        except BaseException as exc:
            logs = self.dump_logs()
            where = f"work dir {self.work_dir}" + (
                "" if self.keep_dir else " removed; set CONVEYOR_K8S_KEEP=1 to keep it"
            )
            self.stop()
            if isinstance(exc, ClusterError):
                raise ClusterError(f"{exc}\n({where})\n{logs}") from None
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``, exactly the processes start() spawned.

        Clients go first so they don't spend their grace period retrying a vanished apiserver,
        and etcd last so the apiserver can finish in-flight writes.
        """
        with self._lock:
            procs, self._procs = self._procs, []
        atexit.unregister(self.stop)
        tiers: list[list[_Proc]] = [
            [p for p in procs if p.name not in ("kube-apiserver", "etcd")],
            [p for p in procs if p.name == "kube-apiserver"],
            [p for p in procs if p.name == "etcd"],
        ]
        for tier in tiers:
            self._terminate(tier)
        for p in procs:
            p.log_file.close()
        if self.work_dir != Path() and not self.keep_dir and self.work_dir.exists():
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _terminate(self, procs: Sequence[_Proc]) -> None:
        # Popen.send_signal is a no-op once the child is reaped, so a recycled PID is never hit;
        # the process groups are only there to keep terminal signals away from the children.
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()

    @property
    def pids(self) -> dict[str, int]:
        with self._lock:
            return {p.name: p.popen.pid for p in self._procs}

    # -- startup ---------------------------------------------------------------------------

    def _start_all(self, deadline: float) -> None:
        etcd_port, peer_port, api_port, kcm_port, sched_port, kwok_port = _free_ports(6)
        self.api_port = api_port
        self.server = f"https://127.0.0.1:{api_port}"
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._write_pki()
        self._write_config_files()

        self._spawn("etcd", self._etcd_args(etcd_port, peer_port))
        self._wait(deadline, "etcd /health", lambda: self._http_ok(f"{self.etcd_url}/health"))
        self._spawn("kube-apiserver", self._apiserver_args(api_port))
        self._wait(deadline, "apiserver /readyz", lambda: self._http_ok(f"{self.server}/readyz"))

        self._spawn("kube-controller-manager", self._kcm_args(kcm_port))
        self._spawn("kube-scheduler", self._scheduler_args(sched_port))
        self._spawn("kwok", self._kwok_args(kwok_port))
        self._create_nodes()
        self._wait(
            deadline,
            "kwok /healthz",
            lambda: self._http_ok(f"http://127.0.0.1:{kwok_port}/healthz"),
        )
        self._wait(
            deadline,
            "controller-manager /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{kcm_port}/healthz", verify=False),
        )
        self._wait(
            deadline,
            "scheduler /readyz",
            lambda: self._http_ok(f"https://127.0.0.1:{sched_port}/readyz", verify=False),
        )
        with self.api_client() as api:
            core = k8s.CoreV1Api(api)
            self._wait(deadline, "nodes Ready", lambda: self._nodes_ready(core))
            # The ServiceAccount admission plugin rejects pods until this exists.
            self._wait(deadline, "default ServiceAccount", lambda: self._sa_exists(core, "default"))

    def _write_pki(self) -> None:
        self.pki_dir = self.work_dir / "pki"
        self.pki_dir.mkdir(mode=0o700, exist_ok=True)
        ca = self._ca = _CertAuthority()
        self.ca_file = self._write(self.pki_dir / "ca.crt", ca.cert_pem())
        cert, key = ca.issue(
            "kube-apiserver",
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ip_addresses=("127.0.0.1", str(ipaddress.ip_network(SERVICE_CIDR)[1])),
        )
        self._write(self.pki_dir / "apiserver.crt", cert)
        self._write(self.pki_dir / "apiserver.key", key)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._write(self.pki_dir / "sa.key", _key_pem(sa_key))
        pub = sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._write(self.pki_dir / "sa.pub", pub)

        # Distinct identities keep the audit log readable: the bootstrap RBAC roles for
        # system:kube-controller-manager and system:kube-scheduler apply as on a real cluster.
        identities = {
            "admin": ("conveyor-admin", ("system:masters",)),
            "kcm": ("system:kube-controller-manager", ()),
            "scheduler": ("system:kube-scheduler", ()),
            "kwok": ("kwok-controller", ("system:masters",)),
        }
        for short, (cn, orgs) in identities.items():
            cert, key = ca.issue(cn, orgs)
            self._write(self.pki_dir / f"{short}.crt", cert)
            self._write(self.pki_dir / f"{short}.key", key)
            self._write_kubeconfig(
                self.work_dir / f"{short}.kubeconfig",
                cn,
                {
                    "client-certificate": str(self.pki_dir / f"{short}.crt"),
                    "client-key": str(self.pki_dir / f"{short}.key"),
                },
            )
        self.kubeconfig = self.work_dir / "admin.kubeconfig"
        # Embedded data rather than paths: Kopf's own kubeconfig reader only takes *-data.
        self._write_kubeconfig(
            self.kubeconfig,
            "conveyor-admin",
            {
                "client-certificate-data": _b64(self.pki_dir / "admin.crt"),
                "client-key-data": _b64(self.pki_dir / "admin.key"),
            },
        )

    def _write_config_files(self) -> None:
        self.audit_log = self.work_dir / "audit.log"
        self._audit = _AuditLog(self.audit_log)
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            # ResponseComplete carries the status code; RequestReceived would double the log.
            "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata"}],
        }
        self._write(self.work_dir / "audit-policy.json", json.dumps(policy).encode())
        rows = []
        for i, (user, token) in enumerate(self.static_tokens.items()):
            groups = ",".join(self._static_groups[user])
            rows.append(
                f'{token},{user},static-{i},"{groups}"' if groups else f"{token},{user},static-{i}"
            )
        self._write(self.pki_dir / "tokens.csv", ("\n".join(rows) + "\n").encode())
        scheduler_config = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(self.work_dir / "scheduler.kubeconfig")},
            "leaderElection": {"leaderElect": False},
        }
        self._write(self.work_dir / "scheduler.json", json.dumps(scheduler_config).encode())

    def _etcd_args(self, port: int, peer_port: int) -> list[str]:
        peer = f"http://127.0.0.1:{peer_port}"
        client = f"http://127.0.0.1:{port}"
        return [
            "--name=conveyor",
            f"--data-dir={self.work_dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=conveyor={peer}",
            # Test data is disposable; fsync dominates etcd latency on shared CI disks.
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648",
            "--log-level=warn",
        ]

    def _apiserver_args(self, port: int) -> list[str]:
        pki = self.pki_dir
        return [
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            "--advertise-address=127.0.0.1",
            # Endpoints may not hold loopback IPs, so the default reconciler would fail forever.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            f"--audit-policy-file={self.work_dir / 'audit-policy.json'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            # Blocking mode writes each event before the request returns, so a test that has
            # just seen its response finds the entry without racing a batch flush.
            "--audit-log-mode=blocking",
            "--audit-log-maxsize=0",
            *self.extra_args.get("kube-apiserver", ()),
        ]

    def _kcm_args(self, port: int) -> list[str]:
        kubeconfig = self.work_dir / "kcm.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            # One ServiceAccount per controller, as on real clusters, so the audit log says
            # which controller made a write.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki_dir / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--controllers={','.join(self.controllers)}",
            *self.extra_args.get("kube-controller-manager", ()),
        ]

    def _scheduler_args(self, port: int) -> list[str]:
        return [
            f"--config={self.work_dir / 'scheduler.json'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            *self.extra_args.get("kube-scheduler", ()),
        ]

    def _kwok_args(self, port: int) -> list[str]:
        return [
            f"--kubeconfig={self.work_dir / 'kwok.kubeconfig'}",
            f"--config={self.bin_dir / KWOK_STAGES}",
            # The cluster has only fake nodes, so no taint/toleration dance is needed.
            "--manage-all-nodes=true",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.1.0.1",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{port}",
            *self.extra_args.get("kwok", ()),
        ]

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        try:
            popen = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                env=env,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),  # noqa: PLW1509 - only calls prctl(2)
            )
        except BaseException:
            log_file.close()
            raise
        with self._lock:
            self._procs.append(_Proc(name, popen, log_path, log_file))

    def _create_nodes(self) -> None:
        with self.api_client() as api:
            core = k8s.CoreV1Api(api)
            for name in self.nodes:
                resources = {"cpu": "32", "memory": "256Gi", "pods": "110"}
                body = k8s.V1Node(
                    metadata=k8s.V1ObjectMeta(
                        name=name,
                        labels={
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "type": "kwok",
                        },
                        annotations={"kwok.x-k8s.io/node": "fake"},
                    ),
                    # kwok's node-initialize stage keeps these; without them it advertises
                    # 1k CPUs, which would hide resource-request mistakes in charts.
                    status=k8s.V1NodeStatus(allocatable=resources, capacity=resources),
                )
                _create_if_missing(functools.partial(core.create_node, body))

    def _wait(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        while True:
            self._check_alive()
            try:
                if ready():
                    return
            except (OSError, ApiException, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def _check_alive(self) -> None:
        with self._lock:
            dead = [p for p in self._procs if p.popen.poll() is not None]
        if dead:
            desc = ", ".join(f"{p.name} (exit {p.popen.returncode})" for p in dead)
            raise ClusterError(f"control plane process died: {desc}")

    def check(self) -> None:
        """Raise ClusterError if any component has exited since start(); cheap, call often."""
        try:
            self._check_alive()
        except ClusterError as exc:
            raise ClusterError(f"{exc}\n{self.dump_logs()}") from None

    def _http_ok(self, url: str, *, verify: bool = True) -> bool:
        if url.startswith("https://"):
            if verify:
                ctx = ssl.create_default_context(cafile=str(self.ca_file))
            else:
                # KCM and the scheduler serve health on self-signed certs of their own.
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPSHandler(context=ctx)]
        else:
            handlers = []
        # An empty ProxyHandler: a developer's HTTPS_PROXY must not capture loopback probes.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)
        try:
            with opener.open(url, timeout=5) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError as exc:
            exc.close()
            return False

    @staticmethod
    def _nodes_ready(core: k8s.CoreV1Api) -> bool:
        # Ready alone is not enough: until node-lifecycle lifts the not-ready taint, new pods
        # are unschedulable and then wait out the scheduler's backoff.
        nodes = core.list_node().items
        ready = [
            n
            for n in nodes
            if n.status
            and any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or ())
            and not any(t.key.startswith("node.kubernetes.io/") for t in n.spec.taints or ())
        ]
        return bool(nodes) and len(ready) == len(nodes)

    @staticmethod
    def _sa_exists(core: k8s.CoreV1Api, namespace: str, name: str = "default") -> bool:
        try:
            core.read_namespaced_service_account(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # -- files -----------------------------------------------------------------------------

    @staticmethod
    def _write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def _write_kubeconfig(
        self, path: Path, user: str, credentials: Mapping[str, str], server: str | None = None
    ) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": _CONTEXT,
                    "cluster": {
                        "server": server or self.server,
                        "certificate-authority-data": _b64(self.ca_file),
                    },
                }
            ],
            "users": [{"name": user, "user": dict(credentials)}],
            "contexts": [{"name": _CONTEXT, "context": {"cluster": _CONTEXT, "user": user}}],
            "current-context": _CONTEXT,
        }
        # JSON is valid YAML, and every kubeconfig reader (client-go, kubernetes, kopf) takes it.
        return self._write(path, json.dumps(config, indent=2).encode())

    # -- clients and identities --------------------------------------------------------------

    def api_client(self, token: str | None = None) -> k8s.ApiClient:
        """A ``kubernetes.client.ApiClient`` (admin, or bearer ``token``); close it after use."""
        cfg = k8s.Configuration()
        cfg.host = self.server
        cfg.ssl_ca_cert = str(self.ca_file)
        if token is None:
            cfg.cert_file = str(self.pki_dir / "admin.crt")
            cfg.key_file = str(self.pki_dir / "admin.key")
        else:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return k8s.ApiClient(cfg)

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """Environment for helm/kubectl subprocesses: KUBECONFIG set, the bin dir first on PATH."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def cert_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        """Kubeconfig with a client certificate for any ``user``/``groups`` (O= fields)."""
        if self._ca is None:
            raise RuntimeError("cluster not started")
        cert, key = self._ca.issue(user, groups)
        return self._write_kubeconfig(
            self.work_dir / f"cert-{user.replace(':', '_')}.kubeconfig",
            user,
            {
                "client-certificate-data": base64.b64encode(cert).decode(),
                "client-key-data": base64.b64encode(key).decode(),
            },
        )

    def server_cert(self, name: str, ip: str = "127.0.0.1") -> tuple[Path, Path]:
        """(cert, key) files of a serving cert for ``ip`` signed by the cluster CA.

        For a test's own TLS endpoint in front of the apiserver (a fault-injecting proxy):
        every kubeconfig of this cluster already trusts it.
        """
        if self._ca is None:
            raise RuntimeError("cluster not started")
        cert, key = self._ca.issue(name, dns_names=("localhost",), ip_addresses=(ip,))
        return (
            self._write(self.pki_dir / f"{name}.crt", cert),
            self._write(self.pki_dir / f"{name}.key", key),
        )

    def via(self, kubeconfig: Path, server: str) -> Path:
        """A copy of ``kubeconfig`` (one this cluster wrote) whose server is ``server``."""
        config = json.loads(kubeconfig.read_text())
        for entry in config["clusters"]:
            entry["cluster"]["server"] = server
        target = kubeconfig.with_name(f"{kubeconfig.stem}-via-{server.rsplit(':', 1)[-1]}.json")
        return self._write(target, json.dumps(config, indent=2).encode())

    def user_kubeconfig(self, user: str) -> Path:
        """Kubeconfig for one of the static token users (see DEFAULT_STATIC_USERS)."""
        token = self.static_tokens[user]
        return self._write_kubeconfig(
            self.work_dir / f"user-{user}.kubeconfig", user, {"token": token}
        )

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        expiration_seconds: int = 3600,
        create: bool = True,
    ) -> str:
        """Mint a token through the TokenRequest API, creating namespace and SA if asked."""
        with self.api_client() as api:
            core = k8s.CoreV1Api(api)
            if create:
                ns = k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace))
                _create_if_missing(lambda: core.create_namespace(ns))
                sa = k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
                _create_if_missing(lambda: core.create_namespaced_service_account(namespace, sa))
            request = k8s.AuthenticationV1TokenRequest(
                spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
            )
            resp = core.create_namespaced_service_account_token(name, namespace, request)
            if resp.status is None or not resp.status.token:
                raise ClusterError(f"TokenRequest for {namespace}/{name} returned no token")
            return str(resp.status.token)

    def service_account_kubeconfig(
        self,
        namespace: str,
        name: str,
        *,
        path: Path | None = None,
        expiration_seconds: int = 3600,
        create: bool = True,
    ) -> Path:
        """Kubeconfig holding a TokenRequest token for ``system:serviceaccount:<ns>:<name>``.

        Tokens are valid for at least 10 minutes (the apiserver's floor) and are not refreshed:
        mint a new kubeconfig for runs longer than ``expiration_seconds``.
        """
        token = self.service_account_token(
            namespace, name, expiration_seconds=expiration_seconds, create=create
        )
        target = path or self.work_dir / f"sa-{namespace}-{name}.kubeconfig"
        return self._write_kubeconfig(target, sa_username(namespace, name), {"token": token})

    # -- audit and logs --------------------------------------------------------------------

    def audit(
        self,
        user: str | None = None,
        verb: str | None = None,
        resource: str | None = None,
        subresource: str | None = None,
        since: dt.datetime | float | None = None,
        *,
        namespace: str | None = None,
        name: str | None = None,
        api_group: str | None = None,
        code: int | None = None,
        stage: str | None = "ResponseComplete",
    ) -> list[AuditEntry]:
        """Audit entries matching every given filter, oldest first.

        ``since`` is an aware datetime or a ``time.time()`` value compared with the request's
        receive time. ``subresource=""`` matches requests on the object itself. ``stage=None``
        also returns the ResponseStarted entries that long-running watches emit.
        """
        if self._audit is None:
            raise RuntimeError("cluster not started")
        if isinstance(since, int | float):
            since = dt.datetime.fromtimestamp(since, dt.UTC)
        out = []
        for e in self._audit.entries():
            if (
                (user is None or e.user == user)
                and (verb is None or e.verb == verb)
                and (resource is None or e.resource == resource)
                and (subresource is None or (e.subresource or "") == subresource)
                and (namespace is None or e.namespace == namespace)
                and (name is None or e.name == name)
                and (api_group is None or e.api_group == api_group)
                and (code is None or e.code == code)
                and (stage is None or e.stage == stage)
                and (since is None or e.received >= since)
            ):
                out.append(e)
        return out

    def wait_for_audit(
        self, *, timeout: float = 10.0, min_count: int = 1, **filters: Any
    ) -> list[AuditEntry]:
        """Poll :meth:`audit` until at least ``min_count`` entries match; raise on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.audit(**filters)
            if len(found) >= min_count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} audit entries match {filters}, want {min_count}")
            time.sleep(0.1)

    def dump_logs(self, lines: int = 60) -> str:
        """The last ``lines`` of each component's log, for failure reports."""
        chunks = []
        for path in sorted(self.log_dir.glob("*.log")) if self.log_dir != Path() else ():
            try:
                tail = _tail(path, lines)
            except OSError as exc:
                tail = [f"<unreadable: {exc}>"]
            chunks.append(f"===== {path.name} (last {len(tail)} lines) =====\n" + "\n".join(tail))
        return "\n".join(chunks)


def _tail(path: Path, lines: int) -> list[str]:
    # Logs of a long session reach many MB; only the end explains a failure.
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 256 * lines))
        return f.read().decode(errors="replace").splitlines()[-lines:]


def _create_if_missing(create: Callable[[], object]) -> None:
    try:
        create()
    except ApiException as exc:
        if exc.status != 409:
            raise


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
