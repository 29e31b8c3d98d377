"""Playing the hour: enqueue each arrival on time, break workers on cue, then wait for the
queue to drain, keeping the live display current all along."""

from __future__ import annotations

import signal
import time
from collections import deque

from conveyor.demo.accounting import Produced
from conveyor.demo.fleet import POOLS, Fleet, Harm
from conveyor.demo.ledger import LedgerKeys, completed_per_class
from conveyor.demo.live import Dashboard
from conveyor.demo.scenario import Moment, Scenario
from conveyor.errors import ConveyorError
from conveyor.queue import Queue

POLL_INTERVAL = 0.5
HARM_PATIENCE = 10.0
"""Seconds a kill or SIGTERM may wait for a worker that is running jobs."""


class Conductor:
    def __init__(
        self,
        queue: Queue,
        fleet: Fleet,
        ledger_keys: LedgerKeys,
        scenario: Scenario,
        dashboard: Dashboard,
    ) -> None:
        self.queue = queue
        self.fleet = fleet
        self.ledger_keys = ledger_keys
        self.scenario = scenario
        self.dashboard = dashboard
        self.produced = Produced()
        self.harms: list[Harm] = []
        self.peak_ready: dict[str, int] = {}
        self.started = time.monotonic()
        self._next_poll = 0.0
        self._retry_at = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def play(self) -> None:
        arrivals = deque(self.scenario.arrivals)
        moments = deque(self.scenario.moments)
        self.started = time.monotonic()
        while arrivals or moments:
            now = self.elapsed()
            due = []
            while arrivals and arrivals[0].at <= now:
                due.append(arrivals.popleft().spec)
            if due:
                self.produced.add(due, self.queue.enqueue_many(due))
            while moments and moments[0].at <= now and now >= self._retry_at:
                moment = moments.popleft()
                if not self._act(moment, now):
                    moments.appendleft(moment)
                    self._retry_at = now + POLL_INTERVAL
            self._poll(draining=False)
            upcoming = [q[0].at for q in (arrivals, moments) if q]
            time.sleep(min(0.05, max(0.0, min(upcoming, default=now) - self.elapsed())))

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is ready, delayed or running; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._poll(draining=True, force=True) == 0:
                return True
            time.sleep(POLL_INTERVAL)
        return False

    def _poll(self, draining: bool, force: bool = False) -> int:
        """Refresh the display; returns the backlog (ready, delayed and running jobs)."""
        now = self.elapsed()
        if not force and now < self._next_poll:
            return -1
        self._next_poll = now + POLL_INTERVAL
        stopped = self.fleet.dead_supervisors()
        if stopped:
            raise ConveyorError(f"worker supervisor(s) {', '.join(stopped)} exited")
        stats = self.queue.stats()
        for row in stats:
            self.peak_ready[row.priority] = max(self.peak_ready.get(row.priority, 0), row.ready)
        completed = completed_per_class(self.queue.client, self.ledger_keys)
        workers = len(self.fleet.workers(self.queue.client))
        self.dashboard.update(now, stats, completed, workers, draining)
        return sum(r.ready + r.due_delayed + r.future_delayed + r.in_flight for r in stats)

    def _act(self, moment: Moment, now: float) -> bool:
        """Carry out a moment; False when it should be tried again shortly."""
        if moment.kind == "note":
            self.dashboard.note(now, moment.text)
            return True
        # A worker broken while idle would show nothing: wait a little for one that is busy.
        patient = now - moment.at < HARM_PATIENCE
        pools: tuple[str, ...]
        if moment.kind == "kill":
            # The general pool holds the long-running jobs: the most to recover.
            sig, pools = signal.SIGKILL, ("general",)
            what = "its supervisor hands its jobs back to the queue at once and replaces it"
        else:
            sig, pools = signal.SIGTERM, tuple(p.name for p in POOLS)
            what = "it stops claiming, lets them finish, exits and is replaced"
        harm = self.fleet.harm(self.queue.client, sig, pools, now, min_busy=1 if patient else 0)
        if harm is None:
            if patient:
                return False
            self.dashboard.note(now, f"no live worker to {moment.kind}")
            return True
        self.harms.append(harm)
        self.dashboard.note(
            now,
            f"{harm.signal} worker process {harm.pid} ({harm.pool} pool, running "
            f"{harm.busy} job{'s' if harm.busy != 1 else ''}): {what}",
        )
        return True
