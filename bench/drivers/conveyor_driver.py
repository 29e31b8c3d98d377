"""Conveyor driver (see bench/README.md): Conveyor exactly as installed in the repository.

Every guarantee stays on: leases with fencing tokens, the event stream that feeds history,
strict priorities with group rotation, rate-limit checks, attempt accounting. The worker is the
real `conveyor worker` supervisor with its worker processes, started through the CLI.

Profiles (CONVEYOR_BENCH_PROFILE): `default` uses the shipped defaults (concurrency 16, claim
batch 64); `tuned` raises concurrency to 256 and the claim batch to 256, which suits no-op or
I/O-bound handlers.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import driverlib
import redis

from conveyor.cli import main as conveyor_cli
from conveyor.queue import Queue

PROFILE = os.environ.get("CONVEYOR_BENCH_PROFILE", "default")
WORKER_OPTIONS = {
    "default": [],
    "tuned": ["--concurrency", "256", "--claim-batch", "256"],
}


class ConveyorDriver(driverlib.Driver):
    name = "conveyor"

    def setup(self) -> None:
        self.queue = Queue(redis.Redis.from_url(driverlib.REDIS_URL))

    def teardown(self) -> None:
        self.queue.client.close()

    def info(self) -> dict[str, Any]:
        return {
            "version": version("conveyor-queue"),
            "bulk_api": "Queue.enqueue_batch",
            "bulk_note": "one Lua call per batch (dedup, events, wake-ups per job inside)",
            "priority": True,
            "priority_note": "four classes, strict order: critical > high > normal > low",
            "notes": [
                f"profile {PROFILE}: {' '.join(WORKER_OPTIONS[PROFILE]) or 'defaults'}",
                "leases, event stream, group rotation and rate-limit checks on",
            ],
        }

    def enqueue_one(self, n: int, lane: str) -> None:
        for i in range(n):
            self.queue.enqueue("noop", {"i": i}, priority=lane)

    def enqueue_bulk(self, n: int, lane: str, batch: int) -> None:
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            self.queue.enqueue_batch("noop", ({"i": i} for i in range(start, stop)), priority=lane)

    def enqueue_probe(self, seq: int, lane: str) -> None:
        self.queue.enqueue("probe", {"seq": seq}, priority=lane)

    def run_worker(self, procs: int, lanes: list[str]) -> None:
        # Worker processes import conveyor_jobs (and driverlib) by module name.
        here = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH", "")) if p
        )
        os.environ["CONVEYOR_LOG_LEVEL"] = "WARNING"
        conveyor_cli(
            [
                "--redis-url",
                driverlib.REDIS_URL,
                "worker",
                "conveyor_jobs",
                "--processes",
                str(procs),
                "--classes",
                ",".join(lanes),
                *WORKER_OPTIONS[PROFILE],
            ],
            standalone_mode=True,
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    driverlib.main(ConveyorDriver())
