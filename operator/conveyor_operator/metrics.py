"""The operator's own Prometheus metrics (poll freshness instead of status heartbeats, K02)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

_TQ = ("namespace", "taskqueue")

LAST_POLL = Gauge(
    "conveyor_operator_last_poll_timestamp_seconds",
    "Unix time of the last successful backlog read of a TaskQueue.",
    _TQ,
)
POLL_ERRORS = Counter(
    "conveyor_operator_poll_errors_total",
    "Backlog reads that failed, by reason.",
    (*_TQ, "reason"),
)
SCALE_WRITES = Counter(
    "conveyor_operator_scale_writes_total",
    "Replica changes written, per class.",
    (*_TQ, "priority"),
)
RECONCILES = Counter(
    "conveyor_operator_reconciles_total",
    "Reconciliations of worker Deployments, by result.",
    ("result",),
)
