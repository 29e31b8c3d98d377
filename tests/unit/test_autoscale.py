"""The desired-replica function (B29, K15 and the HPA semantics it copies)."""

from __future__ import annotations

import pytest

from conveyor_operator.autoscale import Backlog, Recommendations, ScalingPolicy, decide, recommend


def backlog(ready: int = 0, due: int = 0, in_flight: int = 0) -> Backlog:
    return Backlog(ready, due, in_flight)


def test_replicas_are_the_ceiling_of_backlog_over_target() -> None:
    policy = ScalingPolicy(target_backlog=10)
    assert recommend(policy, backlog(ready=1), 0) == 1
    assert recommend(policy, backlog(ready=10), 0) == 1
    assert recommend(policy, backlog(ready=11), 0) == 2


def test_in_flight_work_counts_so_running_jobs_keep_their_workers() -> None:
    policy = ScalingPolicy(target_backlog=1)
    assert recommend(policy, backlog(in_flight=3), 3) == 3
    assert recommend(policy, backlog(ready=1, in_flight=1), 1) == 2


def test_due_delayed_jobs_count_as_backlog() -> None:
    assert recommend(ScalingPolicy(target_backlog=10), backlog(due=5), 0) == 1


def test_activation_threshold_keeps_zero_until_exceeded() -> None:
    policy = ScalingPolicy(target_backlog=10, activation_backlog=5)
    assert recommend(policy, backlog(ready=3), 0) == 0
    assert recommend(policy, backlog(ready=5), 0) == 0
    assert recommend(policy, backlog(ready=6), 0) == 1


def test_activation_is_ignored_when_min_replicas_is_positive() -> None:
    policy = ScalingPolicy(min_replicas=1, activation_backlog=50)
    assert recommend(policy, backlog(), 0) == 1


def test_tolerance_band_keeps_current_size() -> None:
    policy = ScalingPolicy(target_backlog=1, tolerance=0.1, max_replicas=100)
    assert recommend(policy, backlog(ready=21), 20) == 20
    assert recommend(policy, backlog(ready=23), 20) == 23


def test_min_and_max_bound_the_recommendation() -> None:
    policy = ScalingPolicy(min_replicas=2, max_replicas=5, target_backlog=1)
    assert recommend(policy, backlog(), 3) == 2
    assert recommend(policy, backlog(ready=100), 3) == 5


def test_scale_down_waits_for_the_stabilization_window() -> None:
    policy = ScalingPolicy(target_backlog=10, scale_down_window=30)
    history = Recommendations()
    assert decide(policy, backlog(ready=80), 0, history, now=0).replicas == 8
    held = decide(policy, backlog(ready=10), 8, history, now=10)
    assert held.replicas == 8
    assert "stabilization" in held.reason
    assert decide(policy, backlog(ready=10), 8, history, now=29).replicas == 8
    assert decide(policy, backlog(ready=10), 8, history, now=41).replicas == 1


def test_spiky_backlog_does_not_flap() -> None:
    policy = ScalingPolicy(target_backlog=10, scale_down_window=30)
    history = Recommendations()
    current = 0
    sizes = []
    for second in range(0, 120, 2):
        ready = 50 if (second // 2) % 2 == 0 else 0
        current = decide(policy, backlog(ready=ready), current, history, now=second).replicas
        sizes.append(current)
    assert sizes[0] == 5
    assert set(sizes) == {5}


def test_scale_to_zero_only_after_a_whole_window_of_nothing() -> None:
    policy = ScalingPolicy(target_backlog=1, scale_down_window=20)
    history = Recommendations()
    decide(policy, backlog(in_flight=1), 1, history, now=0)
    assert decide(policy, backlog(), 1, history, now=10).replicas == 1
    assert decide(policy, backlog(), 1, history, now=21).replicas == 0


def test_scale_from_zero_is_immediate() -> None:
    policy = ScalingPolicy(target_backlog=10, scale_down_window=300)
    history = Recommendations()
    decide(policy, backlog(), 0, history, now=0)
    assert decide(policy, backlog(ready=1), 0, history, now=1).replicas == 1


@pytest.mark.parametrize(("step", "expected"), [(0, 10), (2, 3), (4, 5)])
def test_scale_up_step_is_bounded(step: int, expected: int) -> None:
    policy = ScalingPolicy(target_backlog=1, max_step_up=step)
    history = Recommendations()
    assert decide(policy, backlog(ready=10), 1, history, now=0).replicas == expected


def test_scale_down_step_is_bounded() -> None:
    policy = ScalingPolicy(target_backlog=1, scale_down_window=0, max_step_down=2)
    history = Recommendations()
    assert decide(policy, backlog(), 7, history, now=0).replicas == 5


def test_a_class_that_ran_work_since_the_last_poll_is_not_idle() -> None:
    """K15 (e): polls that all miss a short job in flight must not read the class as idle."""
    idle = Backlog(0, 0, 0)
    ran = Backlog(0, 0, 0, ran=True)
    policy = ScalingPolicy(min_replicas=0, target_backlog=10)
    assert recommend(policy, idle, current=1) == 0
    assert recommend(policy, ran, current=1) == 1
    assert recommend(policy, ran, current=0) == 1
    # An activation threshold still applies: one job in an interval is one job.
    assert recommend(ScalingPolicy(activation_backlog=5), ran, current=0) == 0
    # It is a floor, not extra backlog.
    assert recommend(policy, Backlog(25, 0, 0, ran=True), current=0) == 3
