"""Aggregate the raw runs and render results.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harness import scaling_report
from harness.stats import summary


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    scenario: str
    higher_is_better: bool
    digits: int = 0


METRICS: tuple[Metric, ...] = (
    Metric("enqueue_one_jps", "Enqueue one by one (jobs/s)", "enqueue_one", True),
    Metric("enqueue_bulk_jps", "Enqueue in bulk (jobs/s)", "drain1", True),
    Metric("drain_1p_jps", "Drain, 1 worker process (jobs/s)", "drain1", True),
    Metric("drain_2p_jps", "Drain, 2 worker processes (jobs/s)", "drain2", True),
    Metric("pickup_p50_ms", "Idle pickup p50 (ms)", "pickup", False, 2),
    Metric("pickup_p99_ms", "Idle pickup p99 (ms)", "pickup", False, 2),
    Metric("critical_p50_ms", "Critical job wait p50 (ms)", "critical", False, 2),
    Metric("critical_p99_ms", "Critical job wait p99 (ms)", "critical", False, 2),
    Metric("worker_rss_mib", "Worker RSS after drain (MiB, process tree)", "drain1", False, 1),
    Metric("worker_processes", "Processes in that tree", "drain1", False),
    Metric("redis_bytes_per_job", "Redis memory per queued job (bytes)", "drain1", False),
)

# Typographic characters go through names so the source stays plain ASCII for linters.
DASH = "\N{EN DASH}"
TIMES = "\N{MULTIPLICATION SIGN}"

RATIO_KEYS = (
    "enqueue_one_jps",
    "enqueue_bulk_jps",
    "drain_1p_jps",
    "drain_2p_jps",
    "pickup_p99_ms",
    "critical_p99_ms",
)


def aggregate(system: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        values = [
            float(run[metric.key])
            for run in system.get("runs", [])
            if isinstance(run.get(metric.key), int | float) and math.isfinite(run[metric.key])
        ]
        if values:
            out[metric.key] = summary(values)
    return out


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


class _Notes:
    """Footnotes, numbered in order of first use and shared by equal texts."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def render(self) -> list[str]:
        return [f"{i}. {t}" for i, t in enumerate(self.texts, 1)]


def _cell(system: dict[str, Any], metric: Metric, notes: _Notes) -> str:
    status = system.get("status")
    if status == "skipped":
        return "— " + notes.ref(f"{system['label']}: {system.get('reason', 'skipped')}")
    if status == "failed":
        return "failed " + notes.ref(f"{system['label']}: {system.get('error', '?')}")
    if metric.scenario == "critical" and not system.get("info", {}).get("priority", False):
        reason = system.get("info", {}).get("priority_note", "no priorities")
        return "n/a " + notes.ref(f"{system['label']}: {reason}")
    agg = system.get("summary", {}).get(metric.key)
    flags = ""
    partial = [r.get(metric.key.replace("_jps", "_partial")) for r in system.get("runs", [])]
    if metric.key.startswith("drain") and any(partial):
        flags += " " + notes.ref(
            f"{system['label']}: rate over a partial drain ({next(p for p in partial if p)}); "
            "the figure is jobs done ÷ time from first pick-up to last completion"
        )
    extra = [r.get(metric.key.replace("_jps", "_extra_executions")) for r in system["runs"]]
    if metric.key.startswith("drain") and any(extra):
        flags += " " + notes.ref(
            f"{system['label']}: counted {max(e for e in extra if e)} more executions than "
            "jobs enqueued (a job ran twice, or was enqueued twice)"
        )
    if metric.key == "enqueue_bulk_jps" and system.get("info", {}).get("bulk_api") is None:
        flags += " " + notes.ref(
            f"{system['label']}: {system['info'].get('bulk_note', 'no bulk API')}"
        )
    if metric.scenario == "critical":
        low_notes = {
            r.get("critical_note") for r in system.get("runs", []) if r.get("critical_note")
        }
        if low_notes:
            flags += " " + notes.ref(f"{system['label']}: {', '.join(sorted(low_notes))}")
    if agg is None:
        errors = system.get("errors", {}).get(metric.scenario)
        return "failed " + notes.ref(
            f"{system['label']} ({metric.scenario}): {errors or 'no data'}"
        )
    text = _fmt(agg["median"], metric.digits)
    if agg["runs"] > 1:
        text += f" ({_fmt(agg['min'], metric.digits)}{DASH}{_fmt(agg['max'], metric.digits)})"
    return text + flags


def _median(system: dict[str, Any], key: str) -> float | None:
    agg = system.get("summary", {}).get(key)
    return None if agg is None else agg["median"]


def _ratio(value: float | None, ref: float | None, higher_is_better: bool) -> str:
    if value is None or ref is None or value <= 0 or ref <= 0:
        return "—"
    r = value / ref if higher_is_better else ref / value
    return f"{r:.2f}{TIMES}"


def _best(systems: list[dict[str, Any]], key: str, higher: bool) -> tuple[str, float] | None:
    found = [(s["label"], v) for s in systems if (v := _median(s, key)) is not None]
    if not found:
        return None
    return (max if higher else min)(found, key=lambda item: item[1])


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    systems: list[dict[str, Any]] = list(results["systems"].values())
    by_key = {m.key: m for m in METRICS}
    notes = _Notes()
    lines = [
        f"# Conveyor against its peers — {meta['started']}",
        "",
        f"Mode: **{meta['mode']}**, {meta['runs']} run(s) per figure; each cell is the median"
        f" with min{DASH}max across runs. "
        f"Machine: {meta['machine']}. Redis {meta['redis_version']} on loopback, persistence off, "
        "flushed before every scenario; every system measured against the same server in the "
        "same run. The machine is shared and noisy: compare ratios, not absolute figures.",
        "",
        f"Sizes: {meta['sizes_text']}.",
        "",
    ]
    if meta.get("scaling_only"):
        return "\n".join([*lines[:-3], "", *scaling_report.render(results)]) + "\n"
    lines += [
        "## Results",
        "",
        "| Figure | " + " | ".join(s["label"] for s in systems) + " |",
        "|---|" + "---:|" * len(systems),
        "| Version | " + " | ".join(s.get("info", {}).get("version", "—") for s in systems) + " |",
    ]
    for metric in METRICS:
        cells = [_cell(s, metric, notes) for s in systems]
        lines.append(f"| {metric.label} | " + " | ".join(cells) + " |")
    lines += ["", *notes.render(), ""]

    python_peers = [s for s in systems if s.get("python_peer")]
    bullmq = results["systems"].get("bullmq")
    lines += [
        "## Ratios in this run",
        "",
        "Each system against the best Python peer for that figure and against BullMQ; "
        f"above 1{TIMES} "
        "means better (faster, or lower latency).",
        "",
        "| Figure | Reference | " + " | ".join(s["label"] for s in systems) + " |",
        "|---|---|" + "---:|" * len(systems),
    ]
    for key in RATIO_KEYS:
        metric = by_key[key]
        best = _best(python_peers, key, metric.higher_is_better)
        ref_text = "—" if best is None else f"{best[0]} ({_fmt(best[1], metric.digits)})"
        ref = None if best is None else best[1]
        row = [_ratio(_median(s, key), ref, metric.higher_is_better) for s in systems]
        lines.append(
            f"| {metric.label} vs best Python peer | {ref_text} | " + " | ".join(row) + " |"
        )
        if bullmq is not None:
            bref = _median(bullmq, key)
            brow = [_ratio(_median(s, key), bref, metric.higher_is_better) for s in systems]
            lines.append(f"| {metric.label} vs BullMQ | BullMQ | " + " | ".join(brow) + " |")
    lines += ["", *_ceiling_lines(results), *_fraction_lines(results, systems)]
    lines += scaling_report.render(results)
    lines += _target_lines(results, python_peers, bullmq)
    return "\n".join(lines) + "\n"


def _ceiling_lines(results: dict[str, Any]) -> list[str]:
    ceiling = results.get("ceiling_summary", {})
    if not ceiling:
        lines = [
            "## Redis ceiling",
            "",
            f"Not measured: {results.get('ceiling_error', 'skipped')}",
            "",
        ]
    else:
        lines = [
            "## Redis ceiling (redis-benchmark on the same server, same run)",
            "",
            "| Command | Clients, pipelining | ops/s | p50 ms |",
            "|---|---|---:|---:|",
        ]
        for agg in ceiling.values():
            rps = agg["rps"]
            text = _fmt(rps["median"], 0)
            if rps["runs"] > 1:
                text += f" ({_fmt(rps['min'], 0)}{DASH}{_fmt(rps['max'], 0)})"
            lines.append(
                f"| {agg['test']} | {agg['label']} | {text} | {agg['p50_ms']['median']:.3f} |"
            )
        lines.append("")
    return [*lines, *_hop_lines(results)]


def _span(agg: dict[str, float]) -> str:
    text = _fmt(agg["median"], 2)
    if agg["runs"] > 1:
        text += f" ({_fmt(agg['min'], 2)}{DASH}{_fmt(agg['max'], 2)})"
    return text


def _hop_lines(results: dict[str, Any]) -> list[str]:
    hop = results.get("hop_summary", {})
    title = "### Bare hand-off through Redis: the floor under idle pickup"
    if results.get("hop_error") or not results.get("hop_runs") or not hop:
        return [title, "", f"Not measured: {results.get('hop_error', 'skipped')}", ""]
    samples = next((v["samples"] for v in hop.values() if "samples" in v), None)
    lines = [
        title,
        "",
        "A consumer process waits in BLPOP on a list; the harness pushes one item and the "
        "consumer notes the time as soon as BLPOP returns, paced like the idle-pickup probes"
        + (f" ({samples} samples after 3 warm-up)" if samples else "")
        + ". No queue is involved: it is the floor any Redis-based queue's idle pickup pays on "
        "this machine, two process wake-ups (Redis, then the consumer) and two loopback hops.",
        "",
        "| Consumer | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|",
    ]
    errors: list[str] = []
    for agg in hop.values():
        if "p50_ms" in agg:
            cells = [_span(agg[f]) for f in ("p50_ms", "p99_ms", "max_ms")]
        else:
            cells = ["failed", "—", "—"]
        lines.append(f"| {agg['label']} | " + " | ".join(cells) + " |")
        errors += [f"{agg['label']}: {e}" for e in agg.get("errors", [])]
    return [*lines, "", *(f"- Failed: {e}" for e in errors), *([""] if errors else [])]


def _fraction_lines(results: dict[str, Any], systems: list[dict[str, Any]]) -> list[str]:
    ceiling = results.get("ceiling_summary", {})
    evalsha = ceiling.get("EVALSHA c1_p1", {}).get("rps", {}).get("median")
    lpush = ceiling.get("LPUSH c50_p16", {}).get("rps", {}).get("median")
    if not evalsha or not lpush:
        return []
    lines = [
        "## As a fraction of what Redis can do",
        "",
        "Drain (1 process) ÷ EVALSHA ops/s from one client without pipelining (one worker is one "
        "connection), and bulk enqueue ÷ LPUSH ops/s with pipeline 16: rough yardsticks of how "
        "many of Redis's cheapest round trips each job costs.",
        "",
        "| | " + " | ".join(s["label"] for s in systems) + " |",
        "|---|" + "---:|" * len(systems),
    ]
    for key, ref, label in (
        ("drain_1p_jps", evalsha, "Drain 1p ÷ EVALSHA (1 client)"),
        ("enqueue_bulk_jps", lpush, "Bulk enqueue ÷ LPUSH (P16)"),
    ):
        cells = []
        for s in systems:
            v = _median(s, key)
            cells.append("—" if v is None else f"{100.0 * v / ref:.1f}%")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _target_lines(
    results: dict[str, Any], python_peers: list[dict[str, Any]], bullmq: dict[str, Any] | None
) -> list[str]:
    conveyor = results["systems"].get("conveyor")
    lines = ["## Issue #3 targets", ""]
    if conveyor is None or not conveyor.get("summary"):
        why = (
            "not in this run"
            if conveyor is None
            else conveyor.get("reason") or conveyor.get("error", "no figures")
        )
        return [*lines, f"Not assessed: Conveyor has no figures ({why}).", ""]

    def ratio(key: str, ref: float | None, higher: bool) -> float | None:
        v = _median(conveyor, key)
        if v is None or ref is None or v <= 0 or ref <= 0:
            return None
        return v / ref if higher else ref / v

    best_drain = _best(python_peers, "drain_1p_jps", True)
    best_p99 = _best([*python_peers, *([bullmq] if bullmq else [])], "pickup_p99_ms", False)
    b = bullmq or {}
    checks = [
        (
            f"Drain 1p ≥ 4{TIMES} fastest Python peer",
            ratio("drain_1p_jps", best_drain[1] if best_drain else None, True),
            4.0,
        ),
        (
            f"Drain 1p ≥ 1.5{TIMES} BullMQ best configuration",
            ratio("drain_1p_jps", _median(b, "drain_1p_jps"), True),
            1.5,
        ),
        (
            f"Bulk enqueue ≥ 2.5{TIMES} BullMQ addBulk",
            ratio("enqueue_bulk_jps", _median(b, "enqueue_bulk_jps"), True),
            2.5,
        ),
        (
            "Idle pickup p99 no worse than the best peer",
            ratio("pickup_p99_ms", best_p99[1] if best_p99 else None, False),
            1.0,
        ),
    ]
    lines += ["| Target | Measured | Met |", "|---|---:|---|"]
    for label, got, need in checks:
        if got is None:
            lines.append(f"| {label} | — | not measured |")
        else:
            verdict = "yes" if got >= need else f"no: short by {100 * (1 - got / need):.0f}%"
            lines.append(f"| {label} | {got:.2f}{TIMES} | {verdict} |")
    measured, met = scaling_report.verdict(results.get("scaling"))
    lines.append(
        f"| Per-job cost flat (±20%) from 10,000 to 1,000,000 queued | {measured} | {met} |"
    )
    return [*lines, ""]
