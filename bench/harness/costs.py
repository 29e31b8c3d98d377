"""Per-job costs over a window of a drain, read from Redis and /proc without touching Conveyor.

- `INFO commandstats`: server time per command. Commands that Lua scripts call are counted
  under their own names too, which shows the Redis structure a cost comes from.
- `SLOWLOG` with a threshold of 0 for the window: the duration of every EVALSHA with its SHA,
  which says which Conveyor script (claim, ack, ...) the server time goes to.
- `INFO cpu` and /proc/<pid>/stat: CPU seconds of redis-server and of the worker's process
  tree, a cost that other load on a shared machine disturbs far less than wall-clock time.
"""

from __future__ import annotations

import ast
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness import proctree
from harness.redis_server import RedisServer
from harness.resp import Client
from harness.systems import DRIVERS_DIR, REPO_DIR

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Harness bookkeeping, not Conveyor's: left out of the per-command profile.
HARNESS_COMMANDS = frozenset(
    {"info", "config|get", "config|set", "slowlog|get", "slowlog|reset", "hello", "ping"}
)
LUA_DIR = REPO_DIR / "worker" / "conveyor" / "lua"
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
        evalsha = profile.get("evalsha", {"calls": 0, "usec": 0})
        return {
            "window_jobs": jobs,
            "commands": profile,
            "evalsha_calls": evalsha["calls"],
            "evalsha_usec_per_job": evalsha["usec"] / jobs,
            "redis_cpu_us_per_job": 1e6 * (self.redis_cpu_s - earlier.redis_cpu_s) / jobs,
            "worker_cpu_us_per_job": 1e6 * (self.worker_cpu_s - earlier.worker_cpu_s) / jobs,
        }


def script_names() -> dict[str, str]:
    """SHA1 -> script name, computed the way conveyor.scripts loads them (prelude + body).

    Read when the capture starts: the tree is shared, and a script edited since the worker
    loaded it shows up under its SHA instead of a wrong name.
    """
    names: dict[str, str] = {}
    try:
        prelude = (LUA_DIR / "_prelude.lua").read_text()
        for path in LUA_DIR.glob("*.lua"):
            if path.name != "_prelude.lua":
                source = prelude + "\n" + path.read_text()
                names[hashlib.sha1(source.encode()).hexdigest()] = path.stem
    except OSError:
        pass
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
            if len(args) < 2 or not isinstance(args[0], bytes) or args[0].lower() != b"evalsha":
                continue
            sha = args[1].decode() if isinstance(args[1], bytes) else "?"
            stat = out.setdefault(self.names.get(sha, f"sha {sha[:10]}"), {"calls": 0, "usec": 0})
            stat["calls"] += 1
            stat["usec"] += int(duration) if isinstance(duration, int) else 0
        return out
