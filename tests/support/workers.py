"""Real ``conveyor worker`` processes for the worker-process and chaos tiers.

``Workers`` starts supervisors exactly as a container would (``python -m conveyor worker
tests.support.tasks``, exec form, its own session), with short lease, heartbeat and sweep
settings in ``CONVEYOR_*`` variables and JSON logs written to one file per supervisor. Every
process is stopped by its PID (and its process group) when the test ends; the tail of every
log is printed then, which pytest shows only for a failing test. The fixtures live in
``tests.support.worker_fixtures``, which test modules load with ``pytest_plugins``.

The module also holds what these tests measure with: the ledger the handlers of
``tests.support.tasks`` write, an INV-1 census of the queue's Redis structures, log readers,
and ``/proc`` readers for CPU time, memory and process trees.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import redis

from conveyor.keys import Keyspace
from tests.support.invariants import Census, census
from tests.support.invariants import events as stream_events
from tests.support.tasks import LEDGER_DB

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL = 150

DEFAULTS: dict[str, str] = {
    "lease_ttl": "3",
    "heartbeat": "1",
    "sweep_interval": "0.5",
    "grace": "2",
    "kill_grace": "1",
    "concurrency": "4",
    "log_format": "json",
}
"""Worker settings of these tiers: cases.md's defaults scaled down so the suite stays fast."""

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll ``probe`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- processes -----------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the command name, which may itself contain spaces.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def local_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets ``pid`` holds open (IPv4, from /proc)."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            columns = line.split()
            if columns[9] in inodes:
                ports.add(int(columns[1].split(":")[1], 16))
    return ports


def redis_clients_of(client: redis.Redis, pid: int, db: int | None = 0) -> list[dict[str, Any]]:
    """``CLIENT LIST`` entries of the connections process ``pid`` has to ``client``'s Redis."""
    ports = local_ports(pid)
    return [
        c
        for c in cast(list[dict[str, Any]], client.client_list())
        if int(c["addr"].rsplit(":", 1)[1]) in ports and (db is None or int(c["db"]) == db)
    ]


def kill_redis_clients(client: redis.Redis, pid: int, db: int | None = 0) -> int:
    """``CLIENT KILL`` every connection of ``pid`` (to database ``db``); returns how many."""
    killed = 0
    for entry in redis_clients_of(client, pid, db):
        killed += int(client.client_kill_filter(_id=entry["id"]))
    return killed


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class WorkerProcess:
    """One supervisor (``conveyor worker``) and the worker processes it runs."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    _known_children: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        found = children_of(self.pid)
        self._known_children.update(found)
        return found

    def child(self, timeout: float = 10) -> int:
        """The pid of the one live worker process, once it has logged that it started."""

        def started() -> int | None:
            live = self.children()
            ready = {e["pid"] for e in self.logs(event="worker_started")}
            return next((pid for pid in live if pid in ready), None)

        return wait_until(started, timeout, f"a started worker process under {self.name}")

    def wait_ready(self, timeout: float = 15) -> WorkerProcess:
        self.child(timeout)
        return self

    def logs(self, **match: Any) -> list[dict[str, Any]]:
        """JSON log entries of the supervisor and its workers whose fields equal ``match``."""
        entries = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_bytes().splitlines():
                if not line.startswith(b"{"):
                    continue
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if all(entry.get(k) == v for k, v in match.items()):
                    entries.append(entry)
        return entries

    def wait_for_log(self, timeout: float, **match: Any) -> dict[str, Any]:
        return wait_until(
            lambda: next(iter(self.logs(**match)), None), timeout, f"log entry {match}"
        )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def kill_everything(self) -> None:
        """``kill -9`` of the supervisor's and every worker process's group, at once."""
        groups = {self.pid, *self.children(), *self._known_children}
        for pgid in groups:
            _kill_group(pgid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL:])


class Workers:
    """Starts and stops the worker supervisors of one test."""

    def __init__(self, redis_url: str, queue: str, ledger: str, directory: Path) -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.ledger = ledger
        self.directory = directory
        self.started: list[WorkerProcess] = []

    def env(self, redis_url: str | None = None, **settings: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
        env.update(
            REDIS_URL=redis_url or self.redis_url,
            CONVEYOR_QUEUE=self.queue,
            CONVEYOR_TEST_LEDGER=self.ledger,
            CONVEYOR_TEST_LEDGER_URL=self.redis_url,
            PYTHONPATH=os.pathsep.join(
                filter(None, [os.environ.get("CV_DEBUG_PATH"), str(REPO_ROOT)])
            ),
            PYTHONUNBUFFERED="1",
        )
        for name, value in {**DEFAULTS, **settings}.items():
            env["CONVEYOR_" + name.upper()] = str(value)
        return env

    def start(
        self,
        *,
        redis_url: str | None = None,
        wait: bool = True,
        argv: list[str] | None = None,
        **settings: Any,
    ) -> WorkerProcess:
        """Start ``conveyor worker tests.support.tasks`` (or ``argv``); settings override
        ``DEFAULTS``."""
        name = f"w{len(self.started) + 1}"
        log_path = self.directory / f"{name}.log"
        argv = argv or [sys.executable, "-m", "conveyor", "worker", "tests.support.tasks"]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self.env(redis_url, **settings),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(name, process, log_path)
        self.started.append(worker)
        return worker.wait_ready() if wait else worker

    def stop_all(self) -> None:
        for worker in self.started:
            if worker.process.poll() is None:
                worker.children()
                worker.signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for worker in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            worker.kill_everything()

    def print_logs(self) -> None:
        for worker in self.started:
            print(f"----- {worker.name} (pid {worker.pid}): {worker.log_path} -----")
            print(worker.log_tail())


@contextlib.contextmanager
def worker_pool(redis_url: str, queue: str, ledger: str, directory: Path) -> Iterator[Workers]:
    """Workers for one test; the logs are printed at the end (shown only if the test failed)."""
    workers = Workers(redis_url, queue, ledger, directory)
    try:
        yield workers
    finally:
        workers.stop_all()
        workers.print_logs()


# -- the ledger ----------------------------------------------------------------------------------


class Ledger:
    """The handlers' record of every execution (``tests.support.tasks.record``)."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.client = client
        self.name = name

    @classmethod
    def at(cls, redis_url: str, name: str) -> Ledger:
        base = redis_url.rsplit("/", 1)[0]
        return cls(redis.Redis.from_url(f"{base}/{LEDGER_DB}"), name)

    def rows(self, job_id: str | None = None, outcome: str | None = None) -> list[dict[str, Any]]:
        rows = [orjson.loads(e) for e in self.client.lrange(self.name, 0, -1)]
        return [
            r
            for r in rows
            if (job_id is None or r["job_id"] == job_id)
            and (outcome is None or r["outcome"] == outcome)
        ]

    def wait_rows(
        self, n: int, timeout: float, job_id: str | None = None, outcome: str | None = None
    ) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            rows = self.rows(job_id, outcome)
            return rows if len(rows) >= n else None

        return wait_until(enough, timeout, f"{n} ledger rows (job {job_id}, outcome {outcome})")

    def close(self) -> None:
        self.client.close()


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    edges = sorted(p for start, end in intervals for p in ((start, 1), (end, -1)))
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


# -- INV-1 ---------------------------------------------------------------------------------------


def assert_conserved(client: redis.Redis, queue: str, accepted: Iterable[str]) -> Census:
    """INV-1 (``tests.support.invariants``) plus: every accepted job is in exactly one state.

    Finished jobs count only if their records are kept (the ``tracked`` fixture); call this
    while no worker is between two steps of a job, as the census reads key by key.
    """
    taken = census(client, Keyspace(queue))
    problems = taken.problems()
    for job_id in accepted:
        states = taken.state_of(job_id)
        if len(states) != 1:
            problems.append(f"{job_id} is in {sorted(states) or 'no state at all'}")
    assert not problems, "INV-1 violated:\n" + "\n".join(problems)
    return taken


def events_of(client: redis.Redis, queue: str, job_id: str) -> list[tuple[str, int, str]]:
    """The (event, attempt, detail) transitions the scripts recorded for one job."""
    return [
        (kind, int(record[3]), str(record[4]))
        for kind, record in stream_events(client, Keyspace(queue))
        if record[0] == job_id
    ]
