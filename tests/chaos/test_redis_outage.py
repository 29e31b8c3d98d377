"""B26: workers ride out a Redis restart and paused writes by themselves: quietly (one warning
per outage), cheaply (no hot loop), and without losing or repeating a job."""

from __future__ import annotations

import time
from pathlib import Path

from conveyor.local import RedisServer
from conveyor.queue import Queue
from tests.support.workers import (
    Ledger,
    WorkerProcess,
    Workers,
    assert_conserved,
    cpu_seconds,
    events_of,
    kill_redis_clients,
    wait_until,
)

pytest_plugins = ["tests.support.worker_fixtures"]

OUTAGE = 3.0


def _warnings(worker: WorkerProcess, pid: int) -> list[str]:
    return [e.get("event", e["message"]) for e in worker.logs(level="WARNING", pid=pid)]


def test_workers_reconnect_after_a_redis_restart_quietly_and_without_spinning(
    workers: Workers, own_redis: RedisServer, own_queue: Queue, job_ledger: Ledger
) -> None:
    # The lease outlives the outage, so the job running through it keeps its lease.
    pool = [workers.start(redis_url=own_redis.url, lease_ttl=10) for _ in range(2)]
    processes = {w.child(): w for w in pool}
    busy = own_queue.enqueue("sleep", {"seconds": 2}).id
    job_ledger.wait_rows(1, timeout=10, job_id=busy)
    before = {pid: _warnings(w, pid) for pid, w in processes.items()}

    own_redis.stop()
    time.sleep(0.5)
    cpu_before = {pid: cpu_seconds(pid) for pid in processes}
    time.sleep(OUTAGE)
    cpu_share = {pid: (cpu_seconds(pid) - cpu_before[pid]) / OUTAGE for pid in processes}
    own_redis.start()
    restarted = time.monotonic()

    jobs = [r.id for r in own_queue.enqueue_batch("noop", ({"i": i} for i in range(20)))]
    wait_until(
        lambda: all(own_queue.get_job(j).state == "done" for j in [busy, *jobs]),
        15,
        "every job to finish after the restart",
    )
    print(
        f"B26: all jobs done {time.monotonic() - restarted:.2f}s after Redis came back; "
        f"worker CPU during the outage {', '.join(f'{s:.1%}' for s in cpu_share.values())}"
    )
    assert max(cpu_share.values()) < 0.15, "a worker spun while Redis was down"
    for pid, worker in processes.items():
        assert worker.child() == pid, "a worker process was replaced"
        during = _warnings(worker, pid)[len(before[pid]) :]
        assert during.count("redis_unreachable") == 1, during
        assert len(during) <= 2, f"more than one warning for one outage: {during}"
    assert [r["outcome"] for r in job_ledger.rows(job_id=busy)] == ["started", "ok"]
    assert own_queue.get_job(busy).attempts == 1
    assert_conserved(own_queue.client, own_queue.keys.queue, [busy, *jobs])


def test_an_ack_blocked_by_paused_writes_is_retried_with_the_same_lease_token(
    workers: Workers,
    own_redis: RedisServer,
    own_queue: Queue,
    job_ledger: Ledger,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    worker = workers.start(redis_url=own_redis.url, lease_ttl=10)
    pid = worker.child()
    job_id = own_queue.enqueue("gated", {"gate": str(gate)}).id
    job_ledger.wait_rows(1, timeout=10, job_id=job_id)

    own_queue.client.client_pause(2500, all=False)  # WRITE: reads go on, writes wait
    gate.touch()
    time.sleep(0.5)  # the ack is waiting behind the pause; cut its connection
    assert kill_redis_clients(own_queue.client, pid) > 0
    worker.wait_for_log(5, event="report_retry")

    wait_until(lambda: own_queue.get_job(job_id).state == "done", 10, "the ack")
    assert len(job_ledger.rows(job_id=job_id)) == 1
    info = own_queue.get_job(job_id)
    assert (info.attempts, info.errors) == (1, [])
    events = events_of(own_queue.client, own_queue.keys.queue, job_id)
    assert [kind for kind, _, _ in events] == ["queued", "started", "completed"]
    assert not worker.logs(event="ack_stale")
    assert_conserved(own_queue.client, own_queue.keys.queue, [job_id])


def test_a_redis_refusing_writes_pauses_claiming_which_resumes_by_itself(
    workers: Workers, own_redis: RedisServer, own_queue: Queue, job_ledger: Ledger
) -> None:
    worker = workers.start(redis_url=own_redis.url)
    pid = worker.child()
    jobs = [r.id for r in own_queue.enqueue_batch("noop", [{}] * 5, delay=1)]

    # Full memory under noeviction: every claim fails with an OOM error once the jobs are due.
    own_queue.client.config_set("maxmemory", 1)
    time.sleep(2.5)
    assert not job_ledger.rows()
    own_queue.client.config_set("maxmemory", 0)

    wait_until(
        lambda: all(own_queue.get_job(j).state == "done" for j in jobs), 10, "claims to resume"
    )
    assert worker.child() == pid
    assert len(job_ledger.rows()) == 5
    assert len(worker.logs(event="claim_failed")) == 1
    assert len(worker.logs(event="heartbeat_failed")) <= 1
    assert_conserved(own_queue.client, own_queue.keys.queue, jobs)
