"""The ``conveyor worker`` parent: keeps worker processes running and relays signals.

Each worker process runs in its own process group, so when one dies (OOM kill, a handler that
kills itself, a recycle after a stuck sync handler) the supervisor also kills whatever that
handler started, then starts a replacement with backoff. SIGTERM is relayed to every worker,
which drains; the supervisor exits 0 once all have exited. A second SIGTERM or SIGINT is
relayed too, telling the workers to hand back at once. The supervisor is meant to be PID 1 of
a container (exec-form entrypoint), so it never ignores a signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.errors import ConveyorError
from conveyor.worker import EXIT_RECYCLE

log = logging.getLogger(__name__)

RESTART_BACKOFF_CAP = 30.0
HEALTHY_RUN = 60.0
"""A worker that ran this long before dying restarts without delay."""


@dataclass
class Child:
    slot: int
    process: subprocess.Popen[bytes]
    started: float
    failures: int = 0


Release = Callable[[int, str], int]
"""Recovers the leases of a dead worker process (by pid) at once; returns how many."""


class Supervisor:
    def __init__(
        self, argv: list[str], processes: int, grace: float, release: Release | None = None
    ) -> None:
        self.argv = argv
        self.processes = processes
        self.grace = grace
        self.release = release
        self.children: dict[int, Child] = {}
        self.signals = 0
        self.stop_deadline: float | None = None
        self._last_failures: dict[int, int] = {}
        self._last_turn = time.monotonic()

    def live(self) -> tuple[bool, str]:
        """Alive while the supervision loop turns; a wedged supervisor must be restarted."""
        stalled = time.monotonic() - self._last_turn
        return stalled < 30, f"supervisor loop last turned {stalled:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        """Ready while not draining and at least one worker process runs. Readiness turns false
        at the first SIGTERM, before any job is handed back."""
        if self.signals:
            return False, "draining"
        running = sum(1 for c in self.children.values() if c.process.poll() is None)
        return running > 0, f"{running}/{self.processes} worker processes running"

    def _spawn(self, slot: int, failures: int = 0) -> None:
        process = subprocess.Popen(self.argv, start_new_session=True)
        self.children[slot] = Child(slot, process, time.monotonic(), failures)
        log.info(
            "worker process %d started (slot %d)",
            process.pid,
            slot,
            extra={"event": "process_started"},
        )

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        if self.stop_deadline is None:
            # Children drain for `grace`; give them a margin to hand back and exit.
            self.stop_deadline = time.monotonic() + self.grace + 10
        log.info(
            "received %s, relaying to %d worker processes",
            signal.Signals(signum).name,
            len(self.children),
            extra={"event": "supervisor_signal"},
        )
        for child in self.children.values():
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self.processes):
            self._spawn(slot)
        restart_at: dict[int, float] = {}
        while self.children or (restart_at and not self.signals):
            for slot, child in list(self.children.items()):
                code = child.process.poll()
                if code is None:
                    continue
                self._reap(child, code)
                del self.children[slot]
                if not self.signals:
                    restart_at[slot] = time.monotonic() + self._restart_delay(child, code)
            for slot, at in list(restart_at.items()):
                if self.signals:
                    restart_at.clear()
                elif time.monotonic() >= at:
                    del restart_at[slot]
                    self._spawn(slot, failures=self._last_failures.get(slot, 0))
            if self.stop_deadline is not None and time.monotonic() > self.stop_deadline:
                for child in self.children.values():
                    log.error(
                        "worker process %d did not exit in time; killing it",
                        child.process.pid,
                        extra={"event": "process_killed"},
                    )
                    _kill_group(child.process.pid)
                self.stop_deadline = None
            self._last_turn = time.monotonic()
            time.sleep(0.05)
        log.info("all worker processes exited", extra={"event": "supervisor_stopped"})
        return 0

    def _restart_delay(self, child: Child, code: int) -> float:
        # A drained exit (code 0: the process alone was asked to stop) or a recycle is no crash.
        healthy = time.monotonic() - child.started > HEALTHY_RUN or code in (0, EXIT_RECYCLE)
        failures = 0 if healthy else child.failures + 1
        self._last_failures[child.slot] = failures
        return 0.0 if failures == 0 else min(RESTART_BACKOFF_CAP, 0.5 * 2 ** (failures - 1))

    def _reap(self, child: Child, code: int) -> None:
        # Whatever the handler started (threads die with the process; child processes do not)
        # lives in the worker's process group.
        _kill_group(child.process.pid)
        _forget_metrics(child.process.pid)
        if code == 0:
            if not self.signals:
                log.info(
                    "worker process %d drained and exited; starting a replacement",
                    child.process.pid,
                    extra={"event": "process_exited"},
                )
            return
        if code == EXIT_RECYCLE:
            log.warning(
                "worker process %d recycled after a stuck handler",
                child.process.pid,
                extra={"event": "process_recycled"},
            )
            return
        cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        log.error(
            "worker process %d %s%s",
            child.process.pid,
            cause,
            "; recovering its leased jobs now" if self.release else "",
            extra={"event": "process_died"},
        )
        if self.release is not None:
            # In a thread: a Redis that hangs must not stall supervision (and liveness).
            threading.Thread(
                target=self._release,
                args=(self.release, child.process.pid, cause),
                name=f"release-{child.process.pid}",
                daemon=True,
            ).start()

    @staticmethod
    def _release(release: Release, pid: int, cause: str) -> None:
        """Its jobs would otherwise wait out their leases (``lease_ttl``) before running again."""
        try:
            released = release(pid, f"worker process {pid} {cause}")
        except ConveyorError as exc:
            log.warning(
                "could not recover the jobs of dead worker process %d now (%s); they return "
                "when their leases expire",
                pid,
                exc,
                extra={"event": "release_failed"},
            )
            return
        log.info(
            "recovered %d leased jobs of dead worker process %d",
            released,
            pid,
            extra={"event": "process_released"},
        )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _forget_metrics(pid: int) -> None:
    # Live-summed gauges of a dead process would otherwise count its slots forever.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def child_argv(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "conveyor", "worker-process", *extra]
