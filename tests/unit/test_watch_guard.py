"""The operator's blind-watch check (K03): listed objects the watch never delivers fail liveness.

The end-to-end form, with a proxy swallowing every re-watch, is
tests/e2e/test_operator_watch_faults.py; here the verdict logic runs on a fake clock.
"""

from __future__ import annotations

from typing import Any

from conveyor_operator.watchdog import DEPLOYMENTS, TASKQUEUES, WatchGuard

GRACE = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard() -> tuple[WatchGuard, Clock]:
    clock = Clock()
    return WatchGuard(None, interval=5, grace=GRACE, clock=clock), clock  # type: ignore[arg-type]


def body(uid: str, version: str) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "resourceVersion": version}}


def test_an_object_delivered_in_time_keeps_liveness_ok() -> None:
    g, clock = guard()
    g.check(TASKQUEUES, [("u1", "ns/tq", "10")])
    clock.now += GRACE - 1
    g.seen(TASKQUEUES, body("u1", "10"))
    clock.now += 5
    g.check(TASKQUEUES, [("u1", "ns/tq", "10")])
    assert g.health() == (True, "alive")


def test_an_object_never_delivered_fails_liveness_and_names_the_watch() -> None:
    g, clock = guard()
    g.check(TASKQUEUES, [("u1", "ns/tq", "10")])
    clock.now += GRACE + 1
    g.check(TASKQUEUES, [("u1", "ns/tq", "10")])
    ok, reason = g.health()
    assert not ok
    assert reason.startswith("the taskqueues watch is blind: ns/tq at resourceVersion 10")
    # Delivered at last: healthy again, without a restart.
    g.seen(TASKQUEUES, body("u1", "10"))
    g.check(TASKQUEUES, [("u1", "ns/tq", "10")])
    assert g.health()[0]


def test_a_newer_version_counts_and_a_changing_object_keeps_its_first_sighting() -> None:
    g, clock = guard()
    g.seen(DEPLOYMENTS, body("d1", "12"))
    g.check(DEPLOYMENTS, [("d1", "ns/tq-low", "11")])  # a burst: only the newest was handled
    g.check(TASKQUEUES, [("u1", "ns/tq", "5")])
    clock.now += GRACE / 2
    g.check(TASKQUEUES, [("u1", "ns/tq", "6")])  # changed again, still undelivered
    clock.now += GRACE / 2 + 1
    g.check(TASKQUEUES, [("u1", "ns/tq", "7")])
    assert not g.health()[0]
    assert "deployments" not in g.health()[1]


def test_deleted_and_unlisted_objects_are_forgotten() -> None:
    g, clock = guard()
    g.check(TASKQUEUES, [("u1", "ns/tq", "10")])
    g.seen(TASKQUEUES, body("u1", "11"), deleted=True)
    clock.now += GRACE + 1
    g.check(TASKQUEUES, [])
    assert g.health()[0]


def test_opaque_versions_compare_for_equality_only() -> None:
    g, clock = guard()
    g.seen(TASKQUEUES, body("u1", "b"))
    g.check(TASKQUEUES, [("u1", "ns/tq", "a")])
    clock.now += GRACE + 1
    g.check(TASKQUEUES, [("u1", "ns/tq", "a")])
    assert not g.health()[0]
