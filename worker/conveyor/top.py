"""``conveyor top``: the queue's live numbers in a terminal, for people on a jump host.

It refreshes from Redis only (stats script, worker heartbeats, dead-letter index), so it works
wherever the CLI can reach Redis and needs neither PostgreSQL nor the dashboard. Where there
is no terminal to redraw (output piped or redirected), ``snapshots`` prints the same view as
successive plain snapshots instead.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import redis.exceptions
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from conveyor.errors import ConveyorError, translate_redis_error
from conveyor.keys import PRIORITY_CLASSES
from conveyor.queue import ClassStats, Queue
from conveyor.workers import WorkerInfo, list_workers

SPARK = " ▁▂▃▄▅▆▇█"


def stats_cells(row: ClassStats) -> list[str]:
    """One class's figures as table cells, in the order of ``conveyor stats`` and ``top``:
    class, ready, due delayed, future delayed, in flight, dead, oldest ready, limited groups."""
    age = "-" if row.oldest_ready_age is None else f"{row.oldest_ready_age:.1f}s"
    return [
        row.priority,
        str(row.ready),
        str(row.due_delayed),
        str(row.future_delayed),
        str(row.in_flight),
        str(row.dead),
        age,
        str(row.limited_groups),
    ]


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top == 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[round(v / top * (len(SPARK) - 1))] for v in values)


@dataclass
class TopView:
    queue: Queue
    history: dict[str, deque[int]] = field(default_factory=dict)
    error: str = ""

    def render(self) -> Group:
        """The view, or a panel saying why Redis could not be read."""
        try:
            view = self.snapshot()
            self.error = ""
        except ConveyorError as exc:
            self.error = str(exc)
            return Group(Panel(f"[red]Redis unreachable:[/red] {self.error}", title="conveyor top"))
        return view

    def snapshot(self) -> Group:
        """The view; raises ``ConveyorError`` when Redis cannot be read."""
        rows = self.queue.stats()
        try:
            workers = list_workers(self.queue.client, self.queue.keys)
        except redis.exceptions.RedisError as exc:  # a raw client call, unlike Queue's
            raise translate_redis_error(exc, "list_workers") from exc
        return Group(self._classes(rows), self._workers(workers))

    def _classes(self, rows: list[ClassStats]) -> Table:
        table = Table(title=f"queue {self.queue.keys.queue} — {time.strftime('%H:%M:%S')}")
        for column in (
            "class",
            "ready",
            "due",
            "future",
            "in flight",
            "dead",
            "oldest",
            "limited",
            "backlog (last 60 s)",
        ):
            if column == "class":  # never shortened: the other headers wrap instead
                table.add_column(column, no_wrap=True, min_width=max(map(len, PRIORITY_CLASSES)))
            elif column.startswith("backlog"):
                table.add_column(column, justify="right")
            else:  # a narrow column folds a number rather than cut it
                table.add_column(column, justify="right", overflow="fold")
        for row in rows:
            trend = self.history.setdefault(row.priority, deque(maxlen=60))
            trend.append(row.backlog)
            table.add_row(*stats_cells(row), sparkline(list(trend)))
        return table

    @staticmethod
    def _workers(workers: list[WorkerInfo]) -> Table:
        table = Table(title=f"{len(workers)} workers")
        for column in ("worker", "pod", "classes", "busy", "draining", "running"):
            # Folded, not cut: worker identities and job ids are copied from here.
            table.add_column(column, overflow="fold")
        for w in workers:
            table.add_row(
                w.identity,
                w.pod or "-",
                ",".join(w.classes),
                f"{w.busy}/{w.concurrency}",
                "yes" if w.draining else "",
                ", ".join(w.jobs[:3]) + (" …" if len(w.jobs) > 3 else ""),
            )
        return table


def run(queue: Queue, interval: float = 1.0, iterations: int | None = None) -> None:
    view = TopView(queue)
    with Live(view.render(), refresh_per_second=4, screen=iterations is None) as live:
        count = 0
        while iterations is None or count < iterations:
            time.sleep(interval)
            live.update(view.render())
            count += 1


def snapshots(queue: Queue, console: Console, interval: float = 1.0, count: int = 1) -> None:
    """Print the view ``count`` times (0: until interrupted), ``interval`` seconds apart, as
    ordinary output: no screen control, and no colour unless ``console`` is a terminal. A
    failure to read Redis ends it with the ``ConveyorError``."""
    view = TopView(queue)
    printed = 0
    while True:
        if printed:
            time.sleep(interval)
            console.print()
        console.print(view.snapshot())
        printed += 1
        if printed == count:
            return
