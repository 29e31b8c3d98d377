"""TaskQueue status conditions: Ready, RedisReachable and Scaling.

A condition's ``lastTransitionTime`` changes only when its status does, so an unchanged state
produces an identical status and no write.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

Condition = dict[str, Any]


def _condition(kind: str, ok: bool, reason: str, message: str) -> Condition:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:512],
    }


def ready(ok: bool, reason: str, message: str) -> Condition:
    return _condition("Ready", ok, reason, message)


def reachable(ok: bool, reason: str, message: str) -> Condition:
    return _condition("RedisReachable", ok, reason, message)


def scaling(ok: bool, reason: str, message: str) -> Condition:
    return _condition("Scaling", ok, reason, message)


def merge(previous: list[Condition], *updates: Condition) -> list[Condition]:
    """Apply ``updates`` over ``previous``, keeping transition times of unchanged statuses."""
    by_type = {c["type"]: c for c in previous}
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for update in updates:
        old = by_type.get(update["type"])
        changed = old is None or old.get("status") != update["status"]
        transition = stamp if changed or old is None else old.get("lastTransitionTime", stamp)
        by_type[update["type"]] = {**update, "lastTransitionTime": transition}
    return [by_type[k] for k in sorted(by_type)]
