"""taskiq driver: `taskiq worker` with its own process manager, Redis stream broker.

taskiq has no bulk enqueue; the bulk figure gathers `kiq()` calls with asyncio.
"""

from __future__ import annotations

import asyncio
import os
import sys
from importlib.metadata import version
from typing import Any

import driverlib
import taskiq_jobs as jobs
from taskiq.cli.worker.args import WorkerArgs
from taskiq.cli.worker.run import run_worker


class TaskiqDriver(driverlib.Driver):
    name = "taskiq"

    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        # Creates the consumer group before anything is queued: a group created later at
        # "$" would never see messages that were already in the stream.
        self.loop.run_until_complete(jobs.broker.startup())

    def teardown(self) -> None:
        self.loop.run_until_complete(jobs.broker.shutdown())
        self.loop.close()

    def info(self) -> dict[str, Any]:
        return {
            "version": f"taskiq {version('taskiq')}, taskiq-redis {version('taskiq-redis')}",
            "bulk_api": None,
            "bulk_note": "no bulk API: kiq() calls gathered with asyncio",
            "priority": False,
            "priority_note": "no job priorities in taskiq-redis brokers",
            "notes": ["RedisStreamBroker; defaults: max_async_tasks=100"],
        }

    def enqueue_one(self, n: int, lane: str) -> None:
        async def go() -> None:
            for i in range(n):
                await jobs.noop.kiq(i)

        self.loop.run_until_complete(go())

    def enqueue_bulk(self, n: int, lane: str, batch: int) -> None:
        async def go() -> None:
            for start in range(0, n, batch):
                stop = min(n, start + batch)
                await asyncio.gather(*(jobs.noop.kiq(i) for i in range(start, stop)))

        self.loop.run_until_complete(go())

    def enqueue_probe(self, seq: int, lane: str) -> None:
        self.loop.run_until_complete(jobs.probe.kiq(seq))

    def run_worker(self, procs: int, lanes: list[str]) -> None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        args = WorkerArgs.from_cli(
            ["taskiq_jobs:broker", "--workers", str(procs), "--log-level", "WARNING"]
        )
        sys.exit(run_worker(args) or 0)


if __name__ == "__main__":
    driverlib.main(TaskiqDriver())
