"""Dramatiq driver: Redis broker, the `dramatiq` CLI's own process supervisor, default threads.

Dramatiq has no bulk enqueue: `group(...).run()` is its way to send many messages and it
sends them one by one, which is what the bulk figure measures.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version
from typing import Any

import dramatiq
import dramatiq_jobs as jobs
import driverlib
from dramatiq import cli


class DramatiqDriver(driverlib.Driver):
    name = "dramatiq"

    def info(self) -> dict[str, Any]:
        return {
            "version": version("dramatiq"),
            "bulk_api": None,
            "bulk_note": "no bulk API: group().run() enqueues one message at a time",
            "priority": True,
            "priority_note": "a queue per lane + actor priority (orders prefetched messages)",
            "notes": ["CLI defaults: 8 threads per process"],
        }

    def enqueue_one(self, n: int, lane: str) -> None:
        actor = jobs.NOOP[lane]
        for i in range(n):
            actor.send(i)

    def enqueue_bulk(self, n: int, lane: str, batch: int) -> None:
        actor = jobs.NOOP[lane]
        for start in range(0, n, batch):
            messages = [actor.message(i) for i in range(start, min(n, start + batch))]
            dramatiq.group(messages).run()  # type: ignore[no-untyped-call]

    def enqueue_probe(self, seq: int, lane: str) -> None:
        jobs.PROBE[lane].send(seq)

    def teardown(self) -> None:
        jobs.broker.close()

    def run_worker(self, procs: int, lanes: list[str]) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        argv = [
            "dramatiq_jobs",
            "--processes",
            str(procs),
            "--path",
            here,
            "--queues",
            *[jobs.QUEUES[lane] for lane in lanes],
        ]
        parsed = cli.make_argument_parser().parse_args(argv)  # type: ignore[no-untyped-call]
        sys.exit(cli.main(parsed))  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    driverlib.main(DramatiqDriver())
