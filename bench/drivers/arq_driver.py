"""arq driver: one asyncio worker per process (arq has no multi-process supervisor).

arq has no bulk enqueue; the bulk figure is `enqueue_job` calls gathered concurrently over
one pool, `batch` at a time, which is how an asyncio producer would send many.
"""

from __future__ import annotations

import asyncio
import sys
from importlib.metadata import version
from typing import Any

import arq_jobs
import driverlib
from arq import create_pool
from arq.connections import ArqRedis
from arq.worker import run_worker


class ArqDriver(driverlib.Driver):
    name = "arq"

    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool: ArqRedis = self.loop.run_until_complete(
            create_pool(arq_jobs.WorkerSettings.redis_settings)
        )

    def teardown(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()

    def info(self) -> dict[str, Any]:
        return {
            "version": version("arq"),
            "bulk_api": None,
            "bulk_note": "no bulk API: enqueue_job calls gathered with asyncio",
            "priority": False,
            "priority_note": "no job priorities (one sorted set per queue, ordered by time)",
            "notes": ["defaults: max_jobs=10, poll_delay=0.5 s"],
        }

    def enqueue_one(self, n: int, lane: str) -> None:
        async def go() -> None:
            for i in range(n):
                await self.pool.enqueue_job("noop", i)

        self.loop.run_until_complete(go())

    def enqueue_bulk(self, n: int, lane: str, batch: int) -> None:
        async def go() -> None:
            for start in range(0, n, batch):
                stop = min(n, start + batch)
                await asyncio.gather(
                    *(self.pool.enqueue_job("noop", i) for i in range(start, stop))
                )

        self.loop.run_until_complete(go())

    def enqueue_probe(self, seq: int, lane: str) -> None:
        self.loop.run_until_complete(self.pool.enqueue_job("probe", seq))

    def run_worker(self, procs: int, lanes: list[str]) -> None:
        if procs > 1:
            driverlib.fan_out(procs, [sys.executable, "-u", __file__, "worker", "--procs", "1"])
            return
        driverlib.quiet_logging()
        run_worker(arq_jobs.WorkerSettings)  # type: ignore[arg-type]


if __name__ == "__main__":
    driverlib.main(ArqDriver())
