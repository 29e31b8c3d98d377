"""What the demo shows while it runs: the clock, each class's progress, what just happened.

On a terminal this redraws in place; elsewhere (CI logs, pipes) it prints each note as it
happens and a one-line summary every few seconds instead.
"""

from __future__ import annotations

from collections import deque

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.text import Text

from conveyor.keys import PRIORITY_CLASSES
from conveyor.queue import ClassStats

PLAIN_SUMMARY_EVERY = 10.0


class Dashboard:
    def __init__(self, console: Console, planned: dict[str, int], duration: float) -> None:
        self.console = console
        self.duration = duration
        self.planned = planned
        self.progress = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
        )
        self.clock = self.progress.add_task("time", total=duration, detail="")
        self.classes: dict[str, TaskID] = {
            c: self.progress.add_task(c, total=planned.get(c, 0), detail="")
            for c in PRIORITY_CLASSES
        }
        self.status = Text()
        self.log: deque[str] = deque(maxlen=8)
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(self._view(), console=console, refresh_per_second=4)
        self._last_summary = -PLAIN_SUMMARY_EVERY

    def _view(self) -> Group:
        return Group(self.progress, self.status, Text("\n".join(self.log), style="dim"))

    def __enter__(self) -> Dashboard:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def note(self, at: float, text: str) -> None:
        line = f"{at:6.1f}s  {text}"
        self.log.append(line)
        if self.live is None:
            self.console.print(line, highlight=False)
        else:
            self.live.update(self._view())

    def update(
        self,
        elapsed: float,
        stats: list[ClassStats],
        completed: dict[str, int],
        workers: int,
        draining: bool,
    ) -> None:
        phase = "draining" if draining else "traffic"
        self.progress.update(
            self.clock, completed=min(elapsed, self.duration), detail=f"{elapsed:5.0f}s {phase}"
        )
        for row in stats:
            # Re-runs after the kill -9 complete some jobs twice: never show more than planned.
            done = min(completed.get(row.priority, 0) + row.dead, self.planned.get(row.priority, 0))
            self.progress.update(
                self.classes[row.priority],
                completed=done,
                detail=(
                    f"ready {row.ready:>5,}  delayed {row.due_delayed + row.future_delayed:>4,}"
                    f"  running {row.in_flight:>3,}  dead {row.dead:>3,}"
                ),
            )
        self.status = Text(f"{workers} worker processes alive", style="cyan")
        if self.live is not None:
            self.live.update(self._view())
        elif elapsed - self._last_summary >= PLAIN_SUMMARY_EVERY:
            self._last_summary = elapsed
            ready = " ".join(f"{r.priority} {r.ready:,}" for r in stats)
            done_all = sum(completed.values())
            self.console.print(
                f"{elapsed:6.1f}s  {phase}: {done_all:,} runs completed; ready: {ready}; "
                f"{workers} worker processes",
                highlight=False,
            )
