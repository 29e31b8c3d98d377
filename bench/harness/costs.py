"""Per-job costs over a window of a drain, read from Redis and /proc without touching Conveyor.

- `INFO commandstats`: server time per command. Commands that Lua scripts call are counted
  under their own names too, which shows the Redis structure a cost comes from.
- `SLOWLOG` with a threshold of 0 for the window: the duration of every FCALL (Conveyor's
  functions, named `conveyor_<version>_<operation>`) and EVALSHA (the bench's own recorder),
  which says which operation (claim, ack, ...) the server time goes to.
- `INFO cpu` and /proc/<pid>/stat: CPU seconds of redis-server and of the worker's process
  tree, a cost that other load on a shared machine disturbs far less than wall-clock time.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness import proctree
from harness.redis_server import RedisServer
from harness.resp import Client
from harness.systems import DRIVERS_DIR

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Harness bookkeeping, not Conveyor's: left out of the per-command profile.
HARNESS_COMMANDS = frozenset(
    {"info", "config|get", "config|set", "slowlog|get", "slowlog|reset", "hello", "ping"}
)
# conveyor_<library version>_<operation>: the operation is what the report names.
FUNCTION_NAME = re.compile(r"^conveyor_[0-9a-f]+_")
# More than a 10^4-job drain produces (a few thousand calls); memory for it is a few MB.
SLOWLOG_CAPACITY = 200_000


def commandstats(server: RedisServer) -> dict[str, tuple[int, int]]:
    """Cumulative (calls, usec) per command since the server started."""
    with server.client() as c:
        raw = c.info("commandstats")
    out: dict[str, tuple[int, int]] = {}
    for key, value in raw.items():
        fields = dict(part.split("=", 1) for part in value.split(","))
        out[key.removeprefix("cmdstat_")] = (int(fields["calls"]), int(fields["usec"]))
    return out


def _delta(
    after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]
) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for cmd, (calls, usec) in after.items():
        calls0, usec0 = before.get(cmd, (0, 0))
        if calls > calls0 and cmd not in HARNESS_COMMANDS:
            out[cmd] = {"calls": calls - calls0, "usec": usec - usec0}
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of a process and everything below it, all threads included."""
    ticks = 0
    for pid in proctree.descendants(root):
        try:
            stat = (proctree.PROC / str(pid) / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def redis_cpu_seconds(server: RedisServer) -> float:
    with server.client() as c:
        cpu = c.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


@dataclass(frozen=True)
class Snapshot:
    """Everything a per-job cost is computed from, read together."""

    jobs: int
    commands: dict[str, tuple[int, int]]
    redis_cpu_s: float
    worker_cpu_s: float

    @classmethod
    def take(cls, server: RedisServer, jobs_done: Callable[[], int], worker_pid: int) -> Snapshot:
        return cls(
            commands=commandstats(server),
            redis_cpu_s=redis_cpu_seconds(server),
            worker_cpu_s=tree_cpu_seconds(worker_pid),
            jobs=jobs_done(),
        )

    def costs_since(self, earlier: Snapshot) -> dict[str, Any]:
        # Give or take one claim batch in flight: the jobs counted are the ones completed
        # while the costs accrued.
        jobs = self.jobs - earlier.jobs
        profile = _delta(self.commands, earlier.commands)
        scripts = [profile.get(name, {"calls": 0, "usec": 0}) for name in ("fcall", "evalsha")]
        return {
            "window_jobs": jobs,
            "commands": profile,
            "script_calls": sum(s["calls"] for s in scripts),
            "script_usec_per_job": sum(s["usec"] for s in scripts) / jobs,
            "redis_cpu_us_per_job": 1e6 * (self.redis_cpu_s - earlier.redis_cpu_s) / jobs,
            "worker_cpu_us_per_job": 1e6 * (self.worker_cpu_s - earlier.worker_cpu_s) / jobs,
        }


def script_names() -> dict[str, str]:
    """SHA1 -> name of the EVALSHA scripts seen in a drain: the drivers' completion counter.
    Conveyor's own operations run as functions, named after the operation (see ScriptTimes)."""
    names: dict[str, str] = {}
    # The drivers' completion counter (driverlib.RECORD_LUA) runs beside Conveyor's scripts.
    try:
        tree = ast.parse((DRIVERS_DIR / "driverlib.py").read_text())
    except (OSError, SyntaxError):
        return names
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "RECORD_LUA" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            names[hashlib.sha1(node.value.value.encode()).hexdigest()] = "bench recorder"
    return names


class ScriptTimes:
    """Every EVALSHA between start() and stop(), from a SLOWLOG that logs everything.

    The server's slowlog settings are put back on stop(); it is our private server, but a
    later scenario should not pay for logging every command.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.saved: list[tuple[str, str]] = []
        self.names: dict[str, str] = {}

    def _config(self, c: Client, name: str, value: str | int) -> None:
        c.call("CONFIG", "SET", name, value)

    def start(self) -> None:
        self.names = script_names()
        with self.server.client() as c:
            for name in ("slowlog-log-slower-than", "slowlog-max-len"):
                reply = c.call("CONFIG", "GET", name)
                if isinstance(reply, list) and isinstance(reply[1], bytes):
                    self.saved.append((name, reply[1].decode()))
            self._config(c, "slowlog-max-len", SLOWLOG_CAPACITY)
            c.call("SLOWLOG", "RESET")
            self._config(c, "slowlog-log-slower-than", 0)

    def stop(self) -> dict[str, dict[str, int]]:
        """{script: {calls, usec}}; empty if start() never ran."""
        if not self.saved:
            return {}
        with self.server.client() as c:
            self._config(c, "slowlog-log-slower-than", -1)
            entries = c.call("SLOWLOG", "GET", -1)
            for name, value in self.saved:
                self._config(c, name, value)
            c.call("SLOWLOG", "RESET")
        self.saved = []
        out: dict[str, dict[str, int]] = {}
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, list) or len(entry) < 4 or not isinstance(entry[3], list):
                continue
            duration, args = entry[2], entry[3]
            if len(args) < 2 or not isinstance(args[0], bytes) or not isinstance(args[1], bytes):
                continue
            command, target = args[0].lower(), args[1].decode(errors="replace")
            if command == b"fcall":
                name = FUNCTION_NAME.sub("", target)
            elif command == b"evalsha":
                name = self.names.get(target, f"sha {target[:10]}")
            else:
                continue
            stat = out.setdefault(name, {"calls": 0, "usec": 0})
            stat["calls"] += 1
            stat["usec"] += int(duration) if isinstance(duration, int) else 0
        return out
