"""RQ driver: default forking `Worker`, `WorkerPool` for several processes, `enqueue_many` in bulk.

Priorities in RQ are queue order: a worker listening on [critical, normal, low] always
drains the earlier queue first, so each lane is its own queue.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import driverlib
import rq_jobs
from redis import Redis
from rq import Queue, Worker
from rq.worker_pool import WorkerPool

QUEUES = {"critical": "bench-critical", "normal": "bench", "low": "bench-low"}


class RQDriver(driverlib.Driver):
    name = "rq"

    def setup(self) -> None:
        self.redis = Redis.from_url(driverlib.REDIS_URL)
        self.queues = {lane: Queue(q, connection=self.redis) for lane, q in QUEUES.items()}

    def teardown(self) -> None:
        self.redis.close()

    def info(self) -> dict[str, Any]:
        return {
            "version": version("rq"),
            "bulk_api": "Queue.enqueue_many (one pipeline per batch)",
            "priority": True,
            "priority_note": "queue order: worker listens on [critical, normal, low]",
            "notes": ["default Worker: forks one work horse per job"],
        }

    def enqueue_one(self, n: int, lane: str) -> None:
        q = self.queues[lane]
        for i in range(n):
            q.enqueue(rq_jobs.noop, i)

    def enqueue_bulk(self, n: int, lane: str, batch: int) -> None:
        q = self.queues[lane]
        for start in range(0, n, batch):
            datas = [
                Queue.prepare_data(rq_jobs.noop, (i,)) for i in range(start, min(n, start + batch))
            ]
            with self.redis.pipeline() as pipe:
                q.enqueue_many(datas, pipeline=pipe)
                pipe.execute()

    def enqueue_probe(self, seq: int, lane: str) -> None:
        self.queues[lane].enqueue(rq_jobs.probe, seq)

    def run_worker(self, procs: int, lanes: list[str]) -> None:
        redis = Redis.from_url(driverlib.REDIS_URL)
        names = [QUEUES[lane] for lane in ("critical", "normal", "low") if lane in lanes]
        if procs == 1:
            Worker(names, connection=redis).work(logging_level="WARNING")
        else:
            WorkerPool(names, connection=redis, num_workers=procs).start(logging_level="WARNING")


if __name__ == "__main__":
    driverlib.main(RQDriver())
