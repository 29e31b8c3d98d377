"""K06: an unreachable Redis never scales anything (least of all to zero) on missing data.

Four faults of the TaskQueue's own Redis, one after the other: connection refused (server
stopped), timeouts (``CLIENT PAUSE``), an authentication failure after a password rotation, and
the Secret deleted. For each: ``RedisReachable=False`` with the fault's reason, exactly one
Warning Event whose ``series.count`` grows, no scale write and no replica change for the whole
outage, and ``RedisReachable=True`` again after recovery. Meanwhile a second TaskQueue on
another Redis keeps scaling within a poll: one hanging Redis must not stall the others.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from conveyor.local import RedisServer
from conveyor.queue import Queue
from tests.e2e.conftest import (
    CLASSES,
    E2E,
    POLL,
    SECRET,
    Event,
    History,
    record_timing,
    wait_for,
)

pytestmark = pytest.mark.k8s_api

PROBE_TIMEOUT = 3.0
"""The operator's Redis socket timeout (conveyor_operator.backlog.PROBE_TIMEOUT)."""
SECRET_BACKOFF_CAP = 20.0
"""Longest wait between the operator's reads of a missing Secret (scaler.SECRET_BACKOFF_CAP)."""
MARGIN = 1.5
LAST_POLL = "conveyor_operator_last_poll_timestamp_seconds"


@pytest.fixture
def private_redis(op: E2E) -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True).start()
    yield server
    server.cleanup()


def test_redis_faults_hold_replicas_and_report_the_reason_with_one_aggregated_event(
    op: E2E, private_redis: RedisServer
) -> None:
    op.secret(private_redis.url)
    op.secret(op.redis_url, name="shared-creds")
    op.apply_tq(op.taskqueue())
    op.apply_tq(op.taskqueue("other", redis={"secretRef": {"name": "shared-creds"}}))
    op.wait_deployments()
    op.wait_deployments("other")
    client = redis.Redis(port=private_redis.port)
    op.on_teardown(client.close)
    jobs = Queue(client, op.queue)

    op.enqueue(30, "normal", queue=jobs)
    op.wait_scale("tq-normal", 3, POLL + 10)
    histories = {p: op.history(f"tq-{p}") for p in CLASSES}
    outage = Outage(op, histories)

    # 1. Connection refused, with 5 low jobs enqueued just after the last good poll.
    last = outage.wait_for_a_poll()
    op.enqueue(5, "low", queue=jobs)
    private_redis.stop()
    outage.check("ConnectionRefused", "RedisUnreachable", POLL, since=last)
    restarted = RedisServer(
        port=private_redis.port, directory=private_redis.directory, appendonly=True
    ).start()
    outage.recover("connection_refused", POLL)
    private_redis.process = restarted.process
    assert op.scale("tq-normal") == 3

    # 2. Timeouts: every command blocks for the pause; the other TaskQueue keeps scaling.
    outage.wait_for_a_poll()
    with redis.Redis(port=private_redis.port) as admin:
        admin.execute_command("CLIENT", "PAUSE", "9000", "ALL")
    paused = time.time()
    other = op.history("other-normal")
    shared_enqueued = op.enqueue(15, "normal")
    op.wait_scale("other-normal", 2, POLL + 10)
    other_up = other.wait_first(lambda r: r == 2)
    record_timing("scale_up_beside_a_hanging_redis", other_up - shared_enqueued)
    assert other_up - shared_enqueued <= POLL + MARGIN
    outage.check("Timeout", "RedisUnreachable", POLL + PROBE_TIMEOUT, since=paused)
    wait_for(lambda: time.time() > paused + 9, 10, "the pause to end")
    outage.recover("timeout", POLL + PROBE_TIMEOUT)

    # 3. Password rotated: existing connections are cut, new ones are refused credentials.
    outage.wait_for_a_poll()
    with redis.Redis(port=private_redis.port) as admin:
        admin.config_set("requirepass", "rotated-secret")
        admin.client_kill_filter(_type="normal", skipme=True)
    outage.check("AuthFailed", "RedisUnreachable", POLL)
    with redis.Redis(port=private_redis.port, password="rotated-secret") as admin:
        admin.config_set("requirepass", "")
    outage.recover("auth_failed", POLL)

    # 4. The Secret deleted: reads of it back off (K02), so recovery waits for the next one.
    outage.wait_for_a_poll()
    op.core.delete_namespaced_secret(SECRET, op.ns)
    outage.check("SecretNotFound", "SecretNotFound", POLL)
    op.secret(private_redis.url)
    outage.recover("secret_not_found", SECRET_BACKOFF_CAP + POLL)

    assert min(r for _, r in histories["normal"].changes()) == 3, "normal left 3 on missing data"


class Outage:
    """Runs the checks every fault shares; remembers replicas from before the first one."""

    def __init__(self, op: E2E, histories: dict[str, History]) -> None:
        self.op = op
        self.histories = histories
        self.started = 0.0
        self.reason = ""
        self.replicas: dict[str, int] = {}

    def wait_for_a_poll(self) -> float:
        """Return right after a successful poll, so a fault lands a whole poll before the next."""
        labels = {"namespace": self.op.ns, "taskqueue": "tq"}
        first = wait_for(lambda: self.op.operator.metric(LAST_POLL, **labels), 10, "a poll")
        return wait_for(
            lambda: (t := self.op.operator.metric(LAST_POLL, **labels)) and t > first and t,
            10,
            "the next poll",
            every=0.02,
        )

    def check(self, reason: str, event: str, detect: float, since: float | None = None) -> None:
        op = self.op
        self.started = since or time.time()
        self.reason = reason
        self.replicas = {p: op.scale(f"tq-{p}") for p in CLASSES}

        reachable = self._condition_becomes("False", detect + POLL + MARGIN)
        assert reachable["reason"] == reason, reachable
        assert op.condition("Ready")["status"] == "False"
        record_timing(f"outage_detected_{reason}", time.time() - self.started)

        # One Warning Event for the outage; repeats of it raise its series count.
        def repeated() -> list[Event] | None:
            found = self._events(event)
            return found if found and found[0].count >= 2 else None

        events = wait_for(
            repeated,
            detect + 4 * SECRET_BACKOFF_CAP if reason == "SecretNotFound" else detect * 3 + 5,
            f"a {event} Event repeated through its series",
        )
        assert len(events) == 1, [(e.name, e.note) for e in events]
        assert events[0].type == "Warning"
        assert reason in events[0].note
        self._held()

    def recover(self, name: str, within: float) -> None:
        began = time.time()
        self._condition_becomes("True", within + MARGIN)
        record_timing(f"outage_recovered_{name}", time.time() - began)
        self._held(until=began)
        assert len(self._events("RedisUnreachable") + self._events("SecretNotFound")) == 1

    def _condition_becomes(self, status: str, timeout: float) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            found = self.op.condition("RedisReachable")
            return found if found.get("status") == status else None

        return wait_for(probe, timeout, f"RedisReachable={status} ({self.reason})")

    def _events(self, reason: str) -> list[Event]:
        return [
            e for e in self.op.events(reason=reason, name="tq") if e.created >= self.started - 0.5
        ]

    def _held(self, until: float | None = None) -> None:
        end = until or time.time()
        for priority in CLASSES:
            deployment = f"tq-{priority}"
            writes = [
                e
                for e in self.op.scale_writes(deployment, since=self.started)
                if e.received.timestamp() <= end
            ]
            assert writes == [], f"{deployment} scaled during the {self.reason} outage"
            changed = [
                (t, r)
                for t, r in self.histories[priority].changes()
                if self.started <= t <= end and r != self.replicas[priority]
            ]
            assert changed == [], f"{deployment} replicas changed during the outage: {changed}"
