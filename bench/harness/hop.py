"""The floor under idle pickup: one bare hand-off through Redis, with no queue at all.

A consumer process sits in BLPOP on a list, as an idle worker sits waiting for a job; the
harness pushes a sequence number and the consumer takes the time the moment BLPOP returns.
That is two process wake-ups (redis-server, then the consumer) and two loopback hops, the least
any Redis-based queue's idle pickup can cost on this machine. Samples are taken exactly like the
idle-pickup probes (same count, warm-up and jittered pause), so the two figures read side by side.

The consumer runs under the interpreter that runs the bench, with redis-py (the repository's
environment has it; the rest of the harness needs no packages). Two variants, because
Conveyor's worker is asyncio: a plain blocking redis-py client, and redis.asyncio.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.procs import Background, CommandError
from harness.redis_server import HOST, RedisServer
from harness.resp import Client
from harness.scenarios import Sizes
from harness.stats import percentile, summary

JOB_KEY = "bench:hop"
ACK_KEY = "bench:hop:ack"
STOP = "stop"
WARMUP = 3
# The first ack also waits out the consumer's start-up (interpreter and redis-py import).
START_TIMEOUT_S = 60
ACK_TIMEOUT_S = 10

# argv: host port job_key ack_key. Nothing but the clock sits between BLPOP returning and the
# timestamp; the ack travels back on the same connection afterwards, outside the measurement.
_SYNC = """
import sys, time
import redis
host, port, key, ack = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
r = redis.Redis(host=host, port=port)
while True:
    _, seq = r.blpop([key])
    now = time.time()
    if seq == b"stop":
        break
    r.lpush(ack, f"{seq.decode()} {now!r}")
"""

_ASYNCIO = """
import asyncio, sys, time
import redis.asyncio as redis
host, port, key, ack = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
async def main():
    r = redis.Redis(host=host, port=port)
    while True:
        _, seq = await r.blpop([key])
        now = time.time()
        if seq == b"stop":
            break
        await r.lpush(ack, f"{seq.decode()} {now!r}")
    await r.aclose()
asyncio.run(main())
"""


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    source: str


VARIANTS: tuple[Variant, ...] = (
    Variant("sync", "redis-py, blocking", _SYNC),
    Variant("asyncio", "redis.asyncio (default event loop)", _ASYNCIO),
)


def _ack(client: Client, seq: int, timeout: float, consumer: Background) -> float:
    """Wait for the consumer's timestamp of `seq`; stale acks (none expected) are skipped.

    BLPOP waits a second at a time so that a consumer that died (redis-py missing, say) is
    reported at once rather than after the whole start-up allowance.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = client.call("BLPOP", ACK_KEY, 1)
        if got is None:
            if not consumer.alive():
                # The last line of a traceback names the error; the run keeps only a first line.
                last = consumer.log_tail(600).splitlines()[-1:] or ["no output"]
                raise CommandError(f"consumer ({sys.executable}) exited: {last[0]}")
            if time.monotonic() > deadline:
                raise CommandError(f"no ack for hand-off {seq} within {timeout:.0f} s")
            continue
        if not isinstance(got, list) or not isinstance(got[1], bytes):
            raise CommandError(f"unexpected BLPOP reply: {got!r}")
        ack_seq, stamp = got[1].decode().split()
        if int(ack_seq) == seq:
            return float(stamp)


def measure(server: RedisServer, variant: Variant, sizes: Sizes, log_path: Path) -> dict[str, Any]:
    """Hand-off latencies (ms) through `server` to one consumer of `variant`."""
    server.flush()
    consumer = Background(
        [sys.executable, "-c", variant.source, HOST, str(server.port), JOB_KEY, ACK_KEY],
        log_path=log_path,
    )
    latencies: list[float] = []
    try:
        with Client(HOST, server.port) as client:
            for seq in range(WARMUP + sizes.pickup_samples):
                sent = time.time()
                client.call("RPUSH", JOB_KEY, seq)
                wait = START_TIMEOUT_S if seq == 0 else ACK_TIMEOUT_S
                started = _ack(client, seq, wait, consumer)
                if seq >= WARMUP:
                    latencies.append((started - sent) * 1000.0)
                # The same jittered pause as the idle-pickup probes: the consumer goes back to
                # sleep in BLPOP, and no sample locks onto a period of the machine.
                time.sleep(random.uniform(0.5, 1.5) * sizes.gap_ms / 1000.0)
            client.call("RPUSH", JOB_KEY, STOP)
    finally:
        consumer.stop(grace=5)
    server.flush()
    return {
        "label": variant.label,
        "interpreter": sys.executable,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "samples_ms": latencies,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: median with min-max of each run's p50, p99 and max, plus any errors."""
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        measured = [r[variant.key] for r in runs if "p50_ms" in r.get(variant.key, {})]
        errors = [r[variant.key]["error"] for r in runs if "error" in r.get(variant.key, {})]
        agg: dict[str, Any] = {"label": variant.label, "errors": errors}
        if measured:
            agg["samples"] = len(measured[0]["samples_ms"])
            for figure in ("p50_ms", "p99_ms", "max_ms"):
                agg[figure] = summary([m[figure] for m in measured])
        out[variant.key] = agg
    return out
