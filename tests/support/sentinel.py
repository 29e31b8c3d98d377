"""A real Sentinel-managed Redis for the tests: one primary, one replica, three sentinels.

Every member is a ``redis-server`` process on a free 127.0.0.1 port, each in its own temporary
directory (``conveyor.local.RedisServer`` for the data nodes, the same binary with
``--sentinel`` for the sentinels), stopped by the PID this module started. The sentinels use a
quorum of two and a short ``down-after-milliseconds``; the data nodes sync without the default
five-second diskless delay, so the old primary rejoins as a replica within seconds.

``SentinelSet.url`` is the ``redis+sentinel://`` URL ``conveyor.connection`` understands;
``failover`` runs ``SENTINEL FAILOVER`` and returns once every sentinel names the new primary.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from conveyor.local import RedisServer, free_port

SERVICE = "conveyor"
QUORUM = 2
DOWN_AFTER_MS = 2000
"""Long enough that a loaded 2-core machine does not trigger failovers of its own."""

# Both data nodes get the same settings, since the roles swap at each failover.
DATA_NODE_ARGS = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")


@dataclass
class SentinelProcess:
    """One ``redis-server --sentinel``; it rewrites its own config, so it gets a copy."""

    primary_port: int
    port: int = field(default_factory=free_port)
    directory: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="conveyor-sentinel-"))
    )
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        config = self.directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        log = self.directory / "sentinel.log"
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [shutil.which("redis-server") or "redis-server", str(config), "--sentinel"],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process
        with self.client() as client:

            def up() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"sentinel on port {self.port} exited; see {log}")
                return _answers(client)

            _until(up, 10, f"sentinel on port {self.port}; see {log}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=0.5)

    def cleanup(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class SentinelSet:
    nodes: list[RedisServer] = field(default_factory=list)
    sentinels: list[SentinelProcess] = field(default_factory=list)

    def url(self, db: int = 0) -> str:
        members = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{members}/{SERVICE}/{db}"

    def start(self) -> SentinelSet:
        try:
            primary = RedisServer(extra_args=DATA_NODE_ARGS).start()
            self.nodes.append(primary)
            replica = RedisServer(
                extra_args=(*DATA_NODE_ARGS, "--replicaof", "127.0.0.1", str(primary.port))
            )
            self.nodes.append(replica.start())
            for _ in range(3):
                self.sentinels.append(SentinelProcess(primary.port).start())
            self.wait_settled(primary.port)
        except BaseException:
            self.cleanup()
            raise
        return self

    def primary_port(self) -> int:
        """The primary's port as the first sentinel names it."""
        with self.sentinels[0].client() as client:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def client(self, port: int, db: int = 0) -> redis.Redis:
        """A plain client of one data node (not following failovers)."""
        return redis.Redis(port=port, db=db, socket_timeout=5)

    def wait_settled(self, primary_port: int, timeout: float = 30) -> None:
        """Until every sentinel names ``primary_port`` as primary, knows the other two
        sentinels, and sees the other data node as a replica with a live link; and that node
        says so itself. Only then can ``SENTINEL FAILOVER`` pick the replica."""
        replica_port = next(n.port for n in self.nodes if n.port != primary_port)

        def settled() -> bool:
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    if not _sentinel_settled(client, primary_port, replica_port):
                        return False
            with self.client(replica_port) as node:
                info = node.info("replication")
            return bool(
                info.get("role") == "slave"
                and int(info.get("master_port", 0)) == primary_port
                and info.get("master_link_status") == "up"
            )

        _until(settled, timeout, f"the sentinel set to settle on primary {primary_port}")

    def failover(self, timeout: float = 30) -> tuple[int, int]:
        """``SENTINEL FAILOVER``; returns (old, new) primary ports once every sentinel names
        the new primary. The old primary may still act as one for a few seconds: the sentinels
        demote it on their next look at it."""
        old = self.primary_port()
        with self.sentinels[0].client() as client:
            client.sentinel_failover(SERVICE)

        def moved() -> bool:
            for sentinel in self.sentinels:
                with sentinel.client() as client, contextlib.suppress(redis.RedisError):
                    _, port = client.sentinel_get_master_addr_by_name(SERVICE)
                    if int(port) == old:
                        return False
            return True

        _until(moved, timeout, "every sentinel to name the new primary")
        return old, self.primary_port()

    def cleanup(self) -> None:
        for sentinel in self.sentinels:
            sentinel.cleanup()
        for node in self.nodes:
            node.cleanup()

    def logs(self) -> str:
        out = []
        for sentinel in self.sentinels:
            text = (sentinel.directory / "sentinel.log").read_text(errors="replace")
            out.append(f"----- sentinel {sentinel.port} -----\n{text[-4000:]}")
        for node in self.nodes:
            text = (node.directory / "redis.log").read_text(errors="replace")
            out.append(f"----- redis {node.port} -----\n{text[-4000:]}")
        return "\n".join(out)


@contextlib.contextmanager
def sentinel_set() -> Iterator[SentinelSet]:
    """A started set; the members' log tails are printed at the end (shown only on failure)."""
    members = SentinelSet().start()
    try:
        yield members
    finally:
        print(members.logs())
        members.cleanup()


def _sentinel_settled(client: redis.Redis, primary_port: int, replica_port: int) -> bool:
    try:
        master: dict[str, Any] = client.sentinel_master(SERVICE)
        replicas: list[dict[str, Any]] = client.sentinel_slaves(SERVICE)
    except redis.RedisError:
        return False
    if int(master["port"]) != primary_port or master["num-other-sentinels"] < 2:
        return False
    return any(
        int(r["port"]) == replica_port
        and not (r["is_sdown"] or r["is_odown"])
        and r.get("master-link-status") == "ok"
        for r in replicas
    )


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _until(probe: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
