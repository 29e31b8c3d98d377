"""How many workers a priority class needs: the HPA's algorithm, fed by what really waits.

The signal is the class's backlog: ready jobs, delayed jobs already due and jobs in flight.
Future-scheduled jobs are not counted (they are not work yet), and in-flight jobs are (a busy
worker is not spare capacity). From it, like the HPA: ``ceil(backlog / target)``, a tolerance
band around the current size, stabilization windows per direction (scale up to the lowest and
down to the highest recommendation seen in the window), bounded steps, min and max. A class
scales to zero only when its recommendation was zero for the whole scale-down window, and
from zero as soon as the backlog passes the activation threshold.

Everything here is pure: time comes in as an argument, so the unit tests drive it with a clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int = 0
    max_replicas: int = 10
    target_backlog: int = 10
    """Backlog one replica is expected to carry."""
    activation_backlog: int = 0
    """With ``min_replicas`` 0, the class leaves zero only when the backlog exceeds this."""
    tolerance: float = 0.1
    """Relative change below which the current size is kept (HPA default 0.1)."""
    scale_up_window: float = 0.0
    """Seconds of recommendations considered when scaling up (HPA default 0)."""
    scale_down_window: float = 300.0
    """Seconds of recommendations considered when scaling down (HPA default 300)."""
    max_step_up: int = 0
    """Most replicas added per decision; 0 means no limit."""
    max_step_down: int = 0
    """Most replicas removed per decision; 0 means no limit."""


@dataclass(frozen=True)
class Backlog:
    ready: int
    due_delayed: int
    in_flight: int
    ran: bool = False
    """Jobs of the class started since the previous poll: in flight was above 0 in between,
    even if every poll found it 0 (short jobs that a busy worker keeps drained, K15 e)."""

    @property
    def total(self) -> int:
        return self.ready + self.due_delayed + self.in_flight

    @property
    def signal(self) -> int:
        """The backlog the decision uses: never 0 for a class that ran work since the last poll,
        so that it reaches zero only after a whole window without any."""
        return max(self.total, 1) if self.ran else self.total


@dataclass(frozen=True)
class Decision:
    replicas: int
    recommendation: int
    """What the backlog alone asks for, before windows and steps."""
    reason: str

    def changes(self, current: int) -> bool:
        return self.replicas != current


@dataclass
class Recommendations:
    """Timestamped recommendations of one class, kept as long as the longer window."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, value: int, keep: float) -> None:
        self.entries.append((now, value))
        while self.entries and self.entries[0][0] < now - keep:
            self.entries.popleft()

    def within(self, now: float, window: float) -> list[int]:
        return [v for t, v in self.entries if t >= now - window]


def recommend(policy: ScalingPolicy, backlog: Backlog, current: int) -> int:
    """Replicas the backlog asks for now, clamped to min/max, with the tolerance band."""
    total = backlog.signal
    active = policy.min_replicas > 0 or total > policy.activation_backlog
    raw = math.ceil(total / policy.target_backlog) if active else 0
    if active and total > 0:
        raw = max(raw, 1)
    raw = min(max(raw, policy.min_replicas), policy.max_replicas)
    if current > 0 and raw > 0 and abs(raw / current - 1) <= policy.tolerance:
        return current
    return raw


def decide(
    policy: ScalingPolicy,
    backlog: Backlog,
    current: int,
    history: Recommendations,
    now: float,
) -> Decision:
    """The replica count to set now, and why."""
    raw = recommend(policy, backlog, current)
    history.add(now, raw, max(policy.scale_up_window, policy.scale_down_window))
    up = min(history.within(now, policy.scale_up_window) or [raw])
    down = max(history.within(now, policy.scale_down_window) or [raw])
    signal = (
        f"backlog {backlog.total} (ready {backlog.ready}, due {backlog.due_delayed}, "
        f"in flight {backlog.in_flight}), target {policy.target_backlog}/replica"
    )
    if backlog.ran and not backlog.total:
        signal += ", jobs ran since the last poll"
    if up > current:
        target = up
        if policy.max_step_up:
            target = min(target, current + policy.max_step_up)
        return Decision(target, raw, f"scale up: {signal}")
    if down < current:
        target = down
        if policy.max_step_down:
            target = max(target, current - policy.max_step_down)
        return Decision(target, raw, f"scale down: {signal}")
    if raw != current:
        window = "scale-up" if raw > current else "scale-down"
        return Decision(current, raw, f"held by the {window} stabilization window: {signal}")
    return Decision(current, raw, f"steady: {signal}")
