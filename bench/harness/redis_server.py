"""One private, non-persistent redis-server on a free loopback port, owned by this run."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import time
from pathlib import Path

from harness.procs import Background, CommandError
from harness.resp import Client, RedisError

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    def __init__(self, log_dir: Path, binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise CommandError(f"{binary} not found (apt-get install redis-server)")
        self.port = _free_port()
        self._workdir = tempfile.mkdtemp(prefix="conveyor-bench-redis-")
        self._proc = Background(
            [
                path,
                "--bind",
                HOST,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._workdir,
                "--protected-mode",
                "yes",
                "--loglevel",
                "warning",
            ],
            log_path=log_dir / "redis-server.log",
        )
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> Client:
        return Client(HOST, self.port)

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._proc.alive():
                raise CommandError(f"redis-server exited: {self._proc.log_tail()}")
            try:
                with self.client() as c:
                    if c.call("PING") == "PONG":
                        return
            except (OSError, RedisError):
                time.sleep(0.05)
        raise CommandError("redis-server did not answer PING in time")

    def flush(self) -> None:
        with self.client() as c:
            c.call("FLUSHALL")
            # Freed memory is returned lazily; without a purge the next "before" reading
            # of used_memory can still include the previous scenario's allocator slack.
            with contextlib.suppress(RedisError):
                c.call("MEMORY", "PURGE")

    def used_memory(self) -> int:
        with self.client() as c:
            return int(c.info("memory")["used_memory"])

    def version(self) -> str:
        with self.client() as c:
            return c.info("server")["redis_version"]

    def stop(self) -> None:
        self._proc.stop(grace=5)
        shutil.rmtree(self._workdir, ignore_errors=True)
