"""``QueueCollector`` on a real Redis exports exactly the queue gauges docs/metrics.md lists, and
with the registry's metrics covers every name the chart's alerts and Grafana dashboard use."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from conveyor.local import free_port
from conveyor.metrics import QueueCollector
from conveyor.queue import Queue
from tests.support.scripted import ScriptedWorker
from tests.unit.test_metrics_reference import (
    NAME,
    QUEUE_SECTION,
    Metric,
    queries,
    reference,
    registry_metrics,
)


def collected(queue: Queue) -> tuple[dict[str, Metric], dict[tuple[str, str], float]]:
    """The collector's metrics, and each sample's value by (name, priority)."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(queue))
    metrics, values = {}, {}
    for family in registry.collect():
        labels = frozenset(k for s in family.samples for k in s.labels)
        # Exposed names: prometheus_client strips a counter family's ``_total`` suffix.
        name = f"{family.name}_total" if family.type == "counter" else family.name
        metrics[name] = Metric(name, family.type, labels)
        for sample in family.samples:
            values[sample.name, sample.labels.get("priority", "")] = sample.value
    return metrics, values


def test_the_collector_exports_the_documented_queue_gauges(queue: Queue, redis_url: str) -> None:
    queue.enqueue("email", priority="high")
    queue.enqueue("report", priority="low", delay=3600)
    dead, running = (e.id for e in queue.enqueue_batch("sms", range(2), priority="normal"))
    worker = ScriptedWorker(redis_url, queue.keys)
    claimed = {job.id: job for job in worker.claim(3, classes=("normal",)).jobs}
    worker.fail(claimed[dead], permanent=True)
    assert running in claimed

    metrics, values = collected(queue)

    assert metrics == reference(QUEUE_SECTION)
    assert values["conveyor_redis_up", ""] == 1
    assert values["conveyor_queue_ready_jobs", "high"] == 1
    assert values["conveyor_queue_future_delayed_jobs", "low"] == 1
    assert values["conveyor_queue_in_flight_jobs", "normal"] == 1
    assert values["conveyor_queue_dead_jobs", "normal"] == 1
    assert values["conveyor_queue_ready_jobs", "critical"] == 0
    assert values["conveyor_rate_limit_deferrals_total", "normal"] == 0


def test_every_metric_the_chart_uses_is_exported_with_a_real_redis(queue: Queue) -> None:
    queue.enqueue("email")
    metrics, _ = collected(queue)
    exported = {s for m in (*registry_metrics().values(), *metrics.values()) for s in m.series()}
    used = {name for expr in queries() for name in NAME.findall(expr)}
    assert used - exported == set()


def test_an_unreachable_redis_is_reported_by_redis_up_alone() -> None:
    nowhere = Queue.from_url(f"redis://127.0.0.1:{free_port()}/0", "q")
    metrics, values = collected(nowhere)
    assert list(metrics) == ["conveyor_redis_up"]
    assert values["conveyor_redis_up", ""] == 0
