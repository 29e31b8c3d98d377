"""SAQ driver: the `saq` runner (multiprocessing for several workers), Redis queue.

SAQ has no bulk enqueue; its own `Queue.map` gathers `enqueue` calls with asyncio, so the bulk
figure does the same without waiting for results.
"""

from __future__ import annotations

import asyncio
import os
import sys
from importlib.metadata import version
from typing import Any

import driverlib
import saq_jobs
from saq.runner import run


class SAQDriver(driverlib.Driver):
    name = "saq"

    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.queue = saq_jobs.make_queue()
        self.loop.run_until_complete(self.queue.connect())

    def teardown(self) -> None:
        self.loop.run_until_complete(self.queue.disconnect())
        self.loop.close()

    def info(self) -> dict[str, Any]:
        return {
            "version": version("saq"),
            "bulk_api": None,
            "bulk_note": "no bulk API: enqueue calls gathered with asyncio (as Queue.map does)",
            "priority": False,
            "priority_note": "no job priorities on the Redis queue",
            "notes": ["defaults: concurrency=10"],
        }

    def enqueue_one(self, n: int, lane: str) -> None:
        async def go() -> None:
            for i in range(n):
                await self.queue.enqueue("noop", i=i)

        self.loop.run_until_complete(go())

    def enqueue_bulk(self, n: int, lane: str, batch: int) -> None:
        async def go() -> None:
            for start in range(0, n, batch):
                stop = min(n, start + batch)
                await asyncio.gather(*(self.queue.enqueue("noop", i=i) for i in range(start, stop)))

        self.loop.run_until_complete(go())

    def enqueue_probe(self, seq: int, lane: str) -> None:
        self.loop.run_until_complete(self.queue.enqueue("probe", seq=seq))

    def run_worker(self, procs: int, lanes: list[str]) -> None:
        # The runner imports settings by dotted path, so this directory must be importable.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        run("saq_jobs.settings", workers=procs)


if __name__ == "__main__":
    driverlib.main(SAQDriver())
