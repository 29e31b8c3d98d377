"""The demo's closing report: what happened to every job, printed as tables and kept as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from conveyor.demo.accounting import Spread, Tally
from conveyor.demo.fleet import Harm
from conveyor.keys import PRIORITY_CLASSES


@dataclass(frozen=True)
class Check:
    name: str
    expected: int
    actual: int

    @property
    def passed(self) -> bool:
        return self.expected == self.actual


@dataclass(frozen=True)
class CustomerRow:
    name: str
    plan: str
    limit: int
    exports: int
    export_wait: Spread
    export_rate: float | None
    """Most export attempts started per second in any 5 seconds."""
    webhooks_delivered: int
    webhooks_dead: int


@dataclass
class Result:
    duration: float
    scale: float
    elapsed: float
    tally: Tally
    waits: dict[str, Spread]
    runtimes: dict[str, Spread]
    peak_ready: dict[str, int]
    customers: list[CustomerRow]
    harms: list[Harm]
    checks: list[Check]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.tally.lost == 0 and all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        t = self.tally
        return {
            "passed": self.passed,
            "lost": t.lost,
            "lost_ids": t.lost_ids[:100],
            "duration": self.duration,
            "scale": self.scale,
            "elapsed_seconds": round(self.elapsed, 1),
            "types": [dataclasses.asdict(x) for x in t.types],
            "accepted": sum(x.accepted for x in t.types),
            "completed": sum(x.completed for x in t.types),
            "dead_lettered": sum(x.dead for x in t.types),
            "pending": sum(x.pending for x in t.types),
            "duplicates_suppressed": sum(x.duplicates for x in t.types),
            "retries": t.retries,
            "failed_attempts": dict(t.failed_attempts),
            "dead_letters": [
                {"type": k[0], "reason": k[1], "count": n} for k, n in t.dead_reasons.items()
            ],
            "states": dict(t.states),
            "discrepancies": t.discrepancies,
            "waits": {k: dataclasses.asdict(v) for k, v in self.waits.items()},
            "runtimes": {k: dataclasses.asdict(v) for k, v in self.runtimes.items()},
            "peak_ready": self.peak_ready,
            "customers": [dataclasses.asdict(c) for c in self.customers],
            "harms": [dataclasses.asdict(h) | _harm_outcomes(self, h) for h in self.harms],
            "checks": [dataclasses.asdict(c) | {"passed": c.passed} for c in self.checks],
            "notes": self.notes,
        }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _jobs_table(result: Result) -> Table:
    table = Table(title="Every job's final state", title_justify="left")
    for name in ("job type", "class", "accepted", "deduplicated", "completed",
                 "dead-lettered", "pending", "retries", "lost"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("job type", "class") else "right")
    rows = result.tally.types
    for t in rows:
        table.add_row(
            t.job_type, t.priority, f"{t.accepted:,}", f"{t.duplicates:,}", f"{t.completed:,}",
            f"{t.dead:,}", f"{t.pending:,}", f"{t.retries:,}", f"{t.lost:,}",
        )  # fmt: skip
    table.add_section()
    table.add_row(
        "all", "",
        *(f"{sum(getattr(t, a) for t in rows):,}" for a in (
            "accepted", "duplicates", "completed", "dead", "pending", "retries", "lost")),
        style="bold",
    )  # fmt: skip
    return table


def _waits_table(result: Result) -> Table:
    table = Table(title="Queue wait (ready to handler start), per class", title_justify="left")
    for name in ("class", "attempts", "wait p50", "wait p99", "wait max", "peak backlog",
                 "run time p50"):  # fmt: skip
        table.add_column(name, justify="left" if name == "class" else "right")
    for priority in PRIORITY_CLASSES:
        s = result.waits.get(priority, Spread.of([]))
        run = result.runtimes.get(priority, Spread.of([]))
        table.add_row(
            priority, f"{s.count:,}", _ms(s.p50), _ms(s.p99), _ms(s.max),
            f"{result.peak_ready.get(priority, 0):,}", _ms(run.p50),
        )  # fmt: skip
    return table


def _customers_table(result: Result) -> Table:
    table = Table(
        title="Customers: fairness between groups and per-customer rate limits",
        title_justify="left",
    )
    for name in ("customer", "plan", "limit", "exports", "export wait p50", "export wait p99",
                 "peak exports/s", "webhooks delivered", "webhooks dead"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("customer", "plan") else "right")
    for c in result.customers:
        rate = "-" if c.export_rate is None else f"{c.export_rate:,.1f}"
        table.add_row(
            c.name, c.plan, f"{c.limit}/s", f"{c.exports:,}", _ms(c.export_wait.p50),
            _ms(c.export_wait.p99), rate, f"{c.webhooks_delivered:,}", f"{c.webhooks_dead:,}",
        )  # fmt: skip
    return table


def _failures_table(result: Result) -> Table:
    t = result.tally
    table = Table(title="Failed attempts and dead letters", title_justify="left")
    table.add_column("what")
    table.add_column("reason")
    table.add_column("count", justify="right")
    for reason, n in t.failed_attempts.most_common():
        table.add_row("failed attempts (all types)", reason, f"{n:,}")
    table.add_section()
    for (job_type, reason), n in sorted(t.dead_reasons.items()):
        table.add_row(f"dead letters: {job_type}", reason, f"{n:,}")
    return table


def _harm_outcomes(result: Result, harm: Harm) -> dict[str, int]:
    t = result.tally
    done = sum(1 for j in harm.jobs if j in t.completed_ids)
    dead = sum(1 for j in harm.jobs if j in t.dead_ids)
    return {"completed": done, "dead_lettered": dead, "lost": len(harm.jobs) - done - dead}


def _harm_table(result: Result) -> Table:
    table = Table(
        title="Workers broken on purpose, and what became of the jobs they held",
        title_justify="left",
    )
    for name in ("at", "signal", "pool", "pid", "jobs held", "completed", "dead-lettered", "lost"):
        table.add_column(name, justify="left" if name in ("signal", "pool") else "right")
    for h in result.harms:
        outcome = _harm_outcomes(result, h)
        table.add_row(
            f"{h.at:.0f} s", h.signal, h.pool, str(h.pid), str(len(h.jobs)),
            str(outcome["completed"]), str(outcome["dead_lettered"]), str(outcome["lost"]),
        )  # fmt: skip
    return table


def _checks_table(result: Result) -> Table:
    table = Table(title="Checks", title_justify="left")
    for name in ("check", "expected", "actual", ""):
        table.add_column(name, justify="left" if name == "check" else "right")
    for c in result.checks:
        mark = "[green]ok[/]" if c.passed else "[bold red]FAILED[/]"
        table.add_row(c.name, f"{c.expected:,}", f"{c.actual:,}", mark)
    return table


def render(console: Console, result: Result) -> None:
    for table in (
        _jobs_table(result),
        _waits_table(result),
        _customers_table(result),
        _failures_table(result),
        _harm_table(result),
        _checks_table(result),
    ):
        console.print(table)
        console.print()
    for note in [*result.notes, *result.tally.discrepancies]:
        console.print(f"note: {note}")
    lost = result.tally.lost
    style = "bold green" if lost == 0 else "bold red"
    accepted = sum(t.accepted for t in result.tally.types)
    console.print(
        f"[{style}]Lost jobs: {lost} of {accepted:,} accepted[/] "
        f"(accepted - completed - dead-lettered, completions from the handlers' own ledger). "
        f"Run time {result.elapsed:.0f} s."
    )
