"""Celery driver: Redis broker, prefork pool with P children, `Producer.batch()` for bulk.

kombu 5.7 added `Producer.batch()`, which pipelines the publishes of one producer; that is the
bulk path. One-by-one uses plain `delay()`.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import celery_jobs as jobs
import driverlib


def _options(lane: str) -> dict[str, Any]:
    priority = jobs.PRIORITIES[lane]
    return {} if priority is None else {"priority": priority}


class CeleryDriver(driverlib.Driver):
    name = "celery"

    def info(self) -> dict[str, Any]:
        return {
            "version": version("celery"),
            "bulk_api": "kombu Producer.batch() (pipelined publish)",
            "priority": True,
            "priority_note": "Redis priority sub-queues (priority=0 critical, 9 low), defaults",
            "notes": ["prefork pool, concurrency = processes, prefetch multiplier 4 (default)"],
        }

    def enqueue_one(self, n: int, lane: str) -> None:
        opts = _options(lane)
        for i in range(n):
            jobs.noop.apply_async((i,), **opts)

    def enqueue_bulk(self, n: int, lane: str, batch: int) -> None:
        opts = _options(lane)
        with jobs.app.producer_or_acquire() as producer:
            for start in range(0, n, batch):
                with producer.batch(max_size=batch):
                    for i in range(start, min(n, start + batch)):
                        jobs.noop.apply_async((i,), producer=producer, **opts)

    def enqueue_probe(self, seq: int, lane: str) -> None:
        jobs.probe.apply_async((seq,), **_options(lane))

    def teardown(self) -> None:
        jobs.app.close()

    def run_worker(self, procs: int, lanes: list[str]) -> None:
        jobs.app.worker_main(
            ["worker", "--pool", "prefork", "--concurrency", str(procs), "--loglevel", "WARNING"]
        )


if __name__ == "__main__":
    driverlib.main(CeleryDriver())
