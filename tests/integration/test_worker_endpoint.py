"""The worker pod's endpoint: probes that follow the drain, metrics summed over processes."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request

from conveyor.local import free_port
from conveyor.queue import Queue
from tests.support.workers import Ledger, Workers, wait_until

pytest_plugins = ["tests.support.worker_fixtures"]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_metrics_sum_over_worker_processes_and_readiness_turns_false_when_draining(
    workers: Workers, tracked: Queue, job_ledger: Ledger
) -> None:
    port = free_port()
    w1 = workers.start(
        processes=2, concurrency=4, metrics_port=port, metrics_host="127.0.0.1", grace=5
    )
    wait_until(lambda: _get(port, "/readyz")[0] == 200, 10, "readiness")
    assert _get(port, "/healthz")[0] == 200

    tracked.enqueue_batch("noop", [{}] * 40)
    job_ledger.wait_rows(40, timeout=20)
    blocker = tracked.enqueue("sleep", {"seconds": 30}).id
    job_ledger.wait_rows(1, timeout=10, job_id=blocker)

    def scraped() -> str:
        return _get(port, "/metrics")[1]

    # Both processes took jobs; the endpoint must add their counters, not show one process.
    wait_until(
        lambda: _sample(scraped(), "conveyor_jobs_completed_total") == 40,
        10,
        "40 completions summed over both processes",
    )
    # Each process reports its slots once its loop runs; the pod's figure is their sum.
    wait_until(lambda: _sample(scraped(), "conveyor_worker_slots") == 8, 10, "8 slots")
    text = scraped()
    assert _sample(text, "conveyor_worker_busy_slots") == 1
    assert 'conveyor_queue_in_flight_jobs{priority="normal"' in text
    assert _sample(text, "conveyor_redis_up") == 1

    w1.signal(signal.SIGTERM)
    wait_until(lambda: _get(port, "/readyz")[0] == 503, 2, "readiness to turn false")
    assert w1.wait(15) == 0
