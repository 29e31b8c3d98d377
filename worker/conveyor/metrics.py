"""Prometheus metrics of producers and workers.

Names follow Prometheus conventions: base units, ``_total`` and ``_seconds`` suffixes, and
bounded labels only (job type and priority class; never a job id or a group key). Queue depth
gauges are computed from Redis at scrape time by ``QueueCollector`` so that every process
reports the same, current numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from conveyor.errors import ConveyorError

if TYPE_CHECKING:
    from conveyor.queue import Queue

_JOB = ("job_type", "priority")
_WAIT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)

JOBS_ENQUEUED = Counter("conveyor_jobs_enqueued_total", "Jobs accepted by enqueue.", _JOB)
JOBS_DEDUPLICATED = Counter(
    "conveyor_jobs_deduplicated_total",
    "Enqueues answered with an existing job's id because its deduplication key was live.",
    _JOB,
)
PAYLOADS_REFUSED = Counter(
    "conveyor_jobs_refused_total",
    "Enqueues refused as invalid (payload too large, ...).",
    ("job_type",),
)
JOBS_STARTED = Counter("conveyor_jobs_started_total", "Attempts started.", _JOB)
JOBS_COMPLETED = Counter("conveyor_jobs_completed_total", "Attempts that succeeded.", _JOB)
JOBS_FAILED = Counter(
    "conveyor_jobs_failed_total", "Attempts that failed (retried or dead-lettered).", _JOB
)
JOBS_RETRIED = Counter("conveyor_jobs_retried_total", "Failed attempts scheduled to retry.", _JOB)
JOBS_DEAD = Counter(
    "conveyor_jobs_dead_lettered_total", "Jobs sent to the dead-letter queue.", _JOB
)
JOBS_POISON = Counter(
    "conveyor_jobs_poison_total",
    "Jobs dead-lettered because they could not be decoded or named no known handler.",
    ("reason",),
)
JOBS_HANDED_BACK = Counter(
    "conveyor_jobs_handed_back_total", "Leased jobs returned unrun by a draining worker.", _JOB
)
JOBS_RECOVERED = Counter(
    "conveyor_jobs_recovered_total", "Expired leases recovered by this process's sweeps."
)
LEASES_LOST = Counter(
    "conveyor_leases_lost_total",
    "Runs whose lease was lost before they finished; their outcome was discarded.",
    _JOB,
)
QUEUE_WAIT = Histogram(
    "conveyor_queue_wait_seconds",
    "Time from becoming ready to being claimed.",
    _JOB,
    buckets=_WAIT_BUCKETS,
)
RUN_TIME = Histogram(
    "conveyor_job_run_seconds", "Time an attempt ran.", _JOB, buckets=_WAIT_BUCKETS
)
SLOTS_BUSY = Gauge(
    "conveyor_worker_busy_slots", "Job slots running a job.", multiprocess_mode="livesum"
)
SLOTS_TOTAL = Gauge(
    "conveyor_worker_slots", "Job slots (concurrency).", multiprocess_mode="livesum"
)
DRAINING = Gauge(
    "conveyor_worker_draining",
    "1 while the worker drains after SIGTERM.",
    multiprocess_mode="livemax",
)
REDIS_RECONNECTS = Counter(
    "conveyor_redis_reconnects_total", "Times a worker lost Redis and reconnected."
)


@dataclass(frozen=True, slots=True)
class JobMetrics:
    """The labelled children of one (job type, priority class)."""

    started: Any
    completed: Any
    failed: Any
    retried: Any
    dead: Any
    handed_back: Any
    lost: Any
    wait: Any
    run: Any


@lru_cache(maxsize=4096)
def for_job(job_type: str, priority: str) -> JobMetrics:
    """Children looked up once per label pair: ``labels()`` on every job cost the worker about
    a fifth of its time per no-op job."""
    labels = (job_type, priority)
    return JobMetrics(
        started=JOBS_STARTED.labels(*labels),
        completed=JOBS_COMPLETED.labels(*labels),
        failed=JOBS_FAILED.labels(*labels),
        retried=JOBS_RETRIED.labels(*labels),
        dead=JOBS_DEAD.labels(*labels),
        handed_back=JOBS_HANDED_BACK.labels(*labels),
        lost=LEASES_LOST.labels(*labels),
        wait=QUEUE_WAIT.labels(*labels),
        run=RUN_TIME.labels(*labels),
    )


class QueueCollector:
    """Queue depth per class, read from Redis at scrape time (one script call per scrape).

    Registered once per pod (by the supervisor's endpoint, not per worker process), so summing
    across processes never double-counts a gauge that describes the shared queue.
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        labels = ("queue", "priority")
        families = {
            "ready": GaugeMetricFamily(
                "conveyor_queue_ready_jobs", "Jobs ready to run now.", labels=labels
            ),
            "due": GaugeMetricFamily(
                "conveyor_queue_due_delayed_jobs",
                "Delayed jobs whose time has come.",
                labels=labels,
            ),
            "future": GaugeMetricFamily(
                "conveyor_queue_future_delayed_jobs", "Delayed jobs not yet due.", labels=labels
            ),
            "in_flight": GaugeMetricFamily(
                "conveyor_queue_in_flight_jobs", "Jobs leased to a worker.", labels=labels
            ),
            "dead": GaugeMetricFamily(
                "conveyor_queue_dead_jobs", "Jobs in the dead-letter queue.", labels=labels
            ),
            "age": GaugeMetricFamily(
                "conveyor_oldest_ready_age_seconds",
                "How long the oldest ready job has waited.",
                labels=labels,
            ),
            "limited": GaugeMetricFamily(
                "conveyor_rate_limited_groups",
                "Groups waiting for their rate limit.",
                labels=labels,
            ),
        }
        deferrals = CounterMetricFamily(
            "conveyor_rate_limit_deferrals",
            "Times a group's next job waited for its rate limit (counted in Redis).",
            labels=labels,
        )
        replayed = CounterMetricFamily(
            "conveyor_jobs_replayed", "Dead letters replayed (counted in Redis).", labels=labels
        )
        up = GaugeMetricFamily(
            "conveyor_redis_up", "1 when the last scrape reached Redis.", labels=("queue",)
        )
        name = self.queue.keys.queue
        try:
            rows = self.queue.stats()
        except ConveyorError:
            up.add_metric([name], 0)
            yield up
            return
        up.add_metric([name], 1)
        for row in rows:
            key = [name, row.priority]
            families["ready"].add_metric(key, row.ready)
            families["due"].add_metric(key, row.due_delayed)
            families["future"].add_metric(key, row.future_delayed)
            families["in_flight"].add_metric(key, row.in_flight)
            families["dead"].add_metric(key, row.dead)
            families["age"].add_metric(key, row.oldest_ready_age or 0.0)
            families["limited"].add_metric(key, row.limited_groups)
            deferrals.add_metric(key, row.rate_limit_deferrals)
            replayed.add_metric(key, row.replayed)
        yield up
        yield from families.values()
        yield deferrals
        yield replayed
