"""The operator's process-wide state, set once at start-up and read by the handlers."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor_operator.kube import Kube
from conveyor_operator.scaler import Scaler
from conveyor_operator.watchdog import WatchGuard


@dataclass
class Runtime:
    kube: Kube
    scaler: Scaler
    identity: str
    guard: WatchGuard


_state: Runtime | None = None


def install(state: Runtime) -> None:
    global _state  # noqa: PLW0603 - Kopf handlers are module functions; this is their context
    _state = state


def runtime() -> Runtime:
    if _state is None:
        raise RuntimeError("the operator runtime is not installed (run conveyor_operator)")
    return _state
