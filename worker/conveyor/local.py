"""Private Redis and PostgreSQL servers on loopback, for the demo, the tests and the benchmark.

Each server lives in its own temporary directory, listens on a free 127.0.0.1 port and is
stopped by the PID this module started. Binaries come from the system (``redis-server``;
PostgreSQL's ``initdb``/``pg_ctl`` from PATH or Debian's ``/usr/lib/postgresql/<v>/bin``);
``scripts/bootstrap.sh`` installs them when missing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from conveyor.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]
    raise ConfigError(f"{name} not found; run scripts/bootstrap.sh to install it")


@dataclass
class RedisServer:
    """A private redis-server; ``appendonly`` turns on AOF with fsync every second."""

    port: int = field(default_factory=free_port)
    appendonly: bool = False
    extra_args: tuple[str, ...] = ()
    directory: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="conveyor-redis-"))
    )
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            _binary("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.directory),
            "--protected-mode",
            "yes",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            *self.extra_args,
        ]
        log = self.directory / "redis.log"
        # The child keeps its own descriptor; ours is closed at once, not left to the GC.
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                args, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise ConfigError(f"redis-server did not start; see {log}") from None
                time.sleep(0.02)
            finally:
                client.close()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster (trust auth on loopback only) with database ``conveyor``."""

    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="conveyor-pg-")))
    user: str = "conveyor"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/conveyor"

    def _run(self, *args: str) -> None:
        # initdb refuses to run as root; the cluster then belongs to the 'postgres' user.
        command = list(args)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"{args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> PostgresServer:
        data = self.directory / "data"
        self._run(
            _binary("initdb"),
            "-D",
            str(data),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._run(
            _binary("pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.directory / "pg.log"),
            "-w",
            "-o",
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            "start",
        )
        self._run(
            _binary("createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            self.user,
            "conveyor",
        )
        return self

    def stop(self) -> None:
        data = self.directory / "data"
        if data.exists():
            with contextlib.suppress(ConfigError):
                self._run(_binary("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def private_redis(**kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.cleanup()
