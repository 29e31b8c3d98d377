"""What Redis itself can do on this server in this run, measured with redis-benchmark."""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass
from typing import Any

from harness.procs import CommandError, run, tail
from harness.redis_server import HOST, RedisServer

# A queue's own commands are mostly one of these; EVALSHA stands in for the Lua scripts that
# every queue here (Conveyor included) uses for its atomic moves.
INCR_LUA = "return redis.call('INCR', KEYS[1])"


@dataclass(frozen=True)
class Probe:
    key: str
    label: str
    clients: int
    pipeline: int
    tests: tuple[str, ...] = ()
    evalsha: bool = False


PROBES: tuple[Probe, ...] = (
    Probe("c50_p1", "50 clients, no pipelining", 50, 1, ("set", "lpush", "rpop")),
    Probe("c50_p1_evalsha", "50 clients, no pipelining", 50, 1, evalsha=True),
    Probe("c50_p16", "50 clients, pipeline 16", 50, 16, ("set", "lpush", "rpop")),
    Probe("c50_p16_evalsha", "50 clients, pipeline 16", 50, 16, evalsha=True),
    # One client without pipelining is the round-trip bound a one-connection worker lives under.
    Probe("c1_p1", "1 client, no pipelining", 1, 1, ("set", "lpush", "rpop")),
    Probe("c1_p1_evalsha", "1 client, no pipelining", 1, 1, evalsha=True),
)


def measure(server: RedisServer, requests: int) -> dict[str, Any]:
    """Return {"<TEST> <probe key>": {"rps": float, "p50_ms": float, ...}}."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise CommandError("redis-benchmark not found (it ships with the redis-server package)")
    with server.client() as c:
        sha = c.call("SCRIPT", "LOAD", INCR_LUA)
    assert isinstance(sha, bytes)
    results: dict[str, Any] = {}
    for probe in PROBES:
        argv = [
            binary,
            "-h",
            HOST,
            "-p",
            str(server.port),
            "-n",
            str(requests),
            "-c",
            str(probe.clients),
            "-P",
            str(probe.pipeline),
            "--csv",
        ]
        if probe.evalsha:
            argv += ["evalsha", sha.decode(), "1", "bench:ceiling"]
        else:
            argv += ["-t", ",".join(probe.tests)]
        done = run(argv, timeout=300)
        if done.returncode != 0:
            raise CommandError(f"redis-benchmark failed: {tail(done.stderr)}")
        for row in csv.DictReader(io.StringIO(done.stdout)):
            name = "EVALSHA" if probe.evalsha else row["test"]
            results[f"{name} {probe.key}"] = {
                "test": name,
                "clients": probe.clients,
                "pipeline": probe.pipeline,
                "label": probe.label,
                "rps": float(row["rps"]),
                "p50_ms": float(row["p50_latency_ms"]),
                "p99_ms": float(row["p99_latency_ms"]),
            }
    server.flush()
    return results
