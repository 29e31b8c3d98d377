"""What the events stream says about the last minutes: throughput, failures and queue waits.

Fed one job event at a time (``Activity.record``) by the feed, read as plain numbers by the page.
Nothing here touches Redis, so the arithmetic is tested without it. Waits are measured from the
moment a job became ready (queued, due after a delay or retry, replayed, handed back) to its
``started`` event; a job that became ready before the dashboard started has no known start and
is not counted.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

HISTORY_SECONDS = 600
"""Per-second counts kept for the throughput chart."""
RATE_SECONDS = 60
"""Window of the throughput and failure rate figures."""
WAIT_SECONDS = 300
"""Window of the wait percentiles."""
MAX_TRACKED_JOBS = 200_000
"""Ready jobs whose ready time is remembered; beyond it the oldest are forgotten (their waits
go unmeasured), which bounds the dashboard's memory under any backlog."""
MAX_WAIT_SAMPLES = 20_000
"""Waits kept per class inside the window; under heavier traffic the window is shorter."""

OUTCOMES = ("completed", "retried", "dead_lettered")
"""Event kinds that end an attempt."""


@dataclass(frozen=True)
class JobEvent:
    """One transition read from the stream."""

    at_ms: int
    kind: str
    job_id: str
    job_type: str
    priority: str
    attempt: int
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at_ms / 1000,
            "kind": self.kind,
            "id": self.job_id,
            "type": self.job_type,
            "priority": self.priority,
            "attempt": self.attempt,
            "detail": self.detail,
        }


def _ready_at(event: JobEvent) -> int | None:
    """When the event made its job claimable (ms), or None if it did not."""
    if event.kind == "queued":
        due = event.detail.removeprefix("at:")
        return max(event.at_ms, int(due)) if due.isdigit() else event.at_ms
    if event.kind == "retried":
        _, _, delay = event.detail.rpartition(":")
        return event.at_ms + int(delay) if delay.isdigit() else None
    if event.kind in ("replayed", "handed_back"):
        return event.at_ms
    return None


def percentile(sorted_values: list[float], share: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Activity:
    seconds: dict[int, Counter[tuple[str, str]]] = field(default_factory=dict)
    totals: Counter[tuple[str, str]] = field(default_factory=Counter)
    """Events by (kind, class) since the dashboard started."""
    ready_since: OrderedDict[str, int] = field(default_factory=OrderedDict)
    waits: dict[str, deque[tuple[int, float]]] = field(default_factory=dict)

    def record(self, event: JobEvent) -> None:
        key = (event.kind, event.priority)
        self.totals[key] += 1
        second = event.at_ms // 1000
        self.seconds.setdefault(second, Counter())[key] += 1
        if len(self.seconds) > HISTORY_SECONDS + 5:
            for old in sorted(self.seconds)[: len(self.seconds) - HISTORY_SECONDS]:
                del self.seconds[old]

        ready = _ready_at(event)
        if ready is not None:
            self.ready_since[event.job_id] = ready
            self.ready_since.move_to_end(event.job_id)
            if len(self.ready_since) > MAX_TRACKED_JOBS:
                self.ready_since.popitem(last=False)
        elif event.kind == "started":
            began = self.ready_since.pop(event.job_id, None)
            if began is not None:
                samples = self.waits.setdefault(event.priority, deque(maxlen=MAX_WAIT_SAMPLES))
                samples.append((event.at_ms, max(0, event.at_ms - began) / 1000))
        elif event.kind == "purged":
            self.ready_since.pop(event.job_id, None)

    def rates(self, now_ms: int, priority: str) -> dict[str, float | None]:
        """Per class over the last ``RATE_SECONDS``: completed per second, the failed share of
        finished attempts, and wait percentiles over ``WAIT_SECONDS``."""
        first = now_ms // 1000 - RATE_SECONDS
        window: Counter[str] = Counter()
        for second, counts in self.seconds.items():
            if second > first:
                for (kind, cls), n in counts.items():
                    if cls == priority:
                        window[kind] += n
        ended = sum(window[k] for k in OUTCOMES)
        failed = window["retried"] + window["dead_lettered"]
        oldest = now_ms - WAIT_SECONDS * 1000
        waits = sorted(w for at, w in self.waits.get(priority, ()) if at >= oldest)
        return {
            "throughput": window["completed"] / RATE_SECONDS,
            "failure_rate": failed / ended if ended else None,
            "wait_p50": percentile(waits, 0.50),
            "wait_p90": percentile(waits, 0.90),
            "wait_p99": percentile(waits, 0.99),
            "wait_samples": float(len(waits)),
        }

    def series(self, now_ms: int, seconds: int = HISTORY_SECONDS) -> dict[str, Any]:
        """Completed and failed attempts per second (all classes), oldest first."""
        last = now_ms // 1000
        completed, failed = [], []
        for second in range(last - seconds + 1, last + 1):
            counts = self.seconds.get(second, Counter())
            completed.append(sum(n for (k, _), n in counts.items() if k == "completed"))
            failed.append(
                sum(n for (k, _), n in counts.items() if k in ("retried", "dead_lettered"))
            )
        return {"start": last - seconds + 1, "completed": completed, "failed": failed}

    def total_counts(self) -> dict[str, dict[str, int]]:
        """``{class: {kind: n}}`` since the dashboard started."""
        out: dict[str, dict[str, int]] = {}
        for (kind, cls), n in self.totals.items():
            out.setdefault(cls, {})[kind] = n
        return out
