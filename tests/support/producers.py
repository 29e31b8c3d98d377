"""Producer processes for multi-process tests, kept light to import: each one is spawned."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.job import JobSpec
from conveyor.metrics import JOBS_DEDUPLICATED
from conveyor.queue import Queue

Answer = tuple[str, str, bool]
"""(dedup key asked for, id answered, created)."""


def deduplicated_total() -> float:
    return sum(
        sample.value
        for metric in JOBS_DEDUPLICATED.collect()
        for sample in metric.samples
        if sample.name == "conveyor_jobs_deduplicated_total"
    )


def dedup_storm(
    url: str, queue_name: str, rounds: int, *, ready: Any, start: Any, out: Any
) -> None:
    """Enqueue keys k1 and k2 through every path `rounds` times, as soon as `start` is set;
    put (answers, this process's increase of conveyor_jobs_deduplicated_total) on `out`."""
    queue = Queue.from_url(url, queue_name)
    run_at = datetime.now(UTC) + timedelta(minutes=10)
    answers: list[Answer] = []
    counted_before = deduplicated_total()
    ready.put(True)
    start.wait(60)
    for _ in range(rounds):
        single = queue.enqueue("t", {"path": "single"}, dedup_key="k1")
        batch = queue.enqueue_many(
            [JobSpec("t", {"path": "batch"}, dedup_key=key) for key in ("k1", "k1", "k2")]
        )
        delayed = queue.enqueue("t", {"path": "delay"}, dedup_key="k1", delay=5)
        scheduled = queue.enqueue("t", {"path": "run_at"}, dedup_key="k1", run_at=run_at)
        keys = ("k1", "k1", "k1", "k2", "k1", "k1")
        results = (single, *batch, delayed, scheduled)
        answers += [(k, r.id, r.created) for k, r in zip(keys, results, strict=True)]
    queue.client.close()
    out.put((answers, deduplicated_total() - counted_before))
