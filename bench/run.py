"""Conveyor against its peers, in one command: see bench/README.md.

python bench/run.py --quick                      # smoke test of the whole matrix
python bench/run.py                              # 3 runs, full sizes
python bench/run.py --systems conveyor,bullmq --runs 5
python bench/run.py --scaling-only               # Conveyor's cost per job, 10^4 to 10^6 queued
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ceiling, envs, hop, report, scaling, scaling_report, scenarios
from harness.driver import DriverClient
from harness.procs import CommandError
from harness.redis_server import RedisServer
from harness.stats import summary
from harness.systems import BENCH_DIR, SYSTEMS, System, by_name


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, 1 run: a smoke test")
    p.add_argument(
        "--systems",
        default=",".join(s.name for s in SYSTEMS),
        help="comma-separated subset (default: all)",
    )
    p.add_argument("--jobs", type=int, help="jobs per bulk enqueue / drain (default 20000)")
    p.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--drain-cap", type=float, help="seconds per drain before a partial rate")
    p.add_argument("--reinstall", action="store_true", help="rebuild the peers' environments")
    p.add_argument(
        "--skip-ceiling",
        action="store_true",
        help="do not measure the Redis ceiling (redis-benchmark and the bare hand-off)",
    )
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<time>)")
    p.add_argument(
        "--scaling-only",
        action="store_true",
        help="only Conveyor's cost per job from 10^4 to 10^6 queued jobs (no ceiling, no peers)",
    )
    p.add_argument("--skip-scaling", action="store_true", help="leave out the scaling scenario")
    p.add_argument(
        "--scaling-k",
        help="comma-separated backlog sizes for the scaling scenario (default 10000,100000,"
        "1000000; 10000,100000 with --quick)",
    )
    p.add_argument("--scaling-drain", type=int, help="jobs drained per backlog size")
    return p.parse_args(argv)


def _sizes(args: argparse.Namespace) -> scenarios.Sizes:
    sizes = scenarios.QUICK if args.quick else scenarios.DEFAULT
    if args.jobs:
        sizes = dataclasses.replace(sizes, jobs=args.jobs)
    if args.drain_cap:
        sizes = dataclasses.replace(sizes, drain_cap_s=args.drain_cap)
    return sizes


def _scaling_sizes(args: argparse.Namespace) -> scaling.ScalingSizes:
    sizes = scaling.SCALING_QUICK if args.quick else scaling.SCALING_DEFAULT
    if args.scaling_k:
        sizes = dataclasses.replace(
            sizes, ks=tuple(int(k.replace("_", "")) for k in args.scaling_k.split(","))
        )
    if args.scaling_drain:
        sizes = dataclasses.replace(sizes, drain=args.scaling_drain)
    return sizes


def _machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = _sizes(args)
        self.scaling_sizes = _scaling_sizes(args)
        if args.scaling_only:
            args.systems, args.skip_ceiling = scaling.SYSTEM, True
        self.runs = args.runs or (1 if args.quick else 3)
        self.selected = by_name([n.strip() for n in args.systems.split(",") if n.strip()])
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.out_dir: Path = args.out or BENCH_DIR / "results" / stamp
        self.log_dir = self.out_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {
            "meta": {},
            "ceiling_runs": [],
            "hop_runs": [],
            "systems": {},
        }
        self.drivers: dict[str, DriverClient] = {}

    def save(self) -> None:
        path = self.out_dir / "results.json"
        path.write_text(json.dumps(self.results, indent=2, default=str), encoding="utf-8")

    def prepare(self, system: System, server: RedisServer) -> None:
        entry: dict[str, Any] = {
            "label": system.label,
            "python_peer": system.python_peer,
            "runs": [],
            "errors": {},
        }
        self.results["systems"][system.name] = entry
        if system.kind == "repo" and not system.driver.exists():
            # A placeholder column: never invent figures for a system with no driver.
            entry.update(status="skipped", reason=f"driver not yet written ({system.driver.name})")
            _log(f"{system.name}: skipped, driver not yet written")
            return
        try:
            _log(f"{system.name}: preparing environment")
            argv = envs.ensure(system, reinstall=self.args.reinstall)
            driver = DriverClient(system, argv, server.url, self.log_dir)
            info = driver.call("info", timeout=120)
            info.pop("ok", None)
            entry.update(status="ok", info=info)
            self.drivers[system.name] = driver
            _log(f"{system.name}: {info.get('version')}")
        except CommandError as exc:
            entry.update(status="failed", error=str(exc).splitlines()[0][:400], detail=str(exc))
            _log(f"{system.name}: FAILED to prepare: {exc}")

    def run_system(self, name: str, server: RedisServer, run: int) -> None:
        entry = self.results["systems"][name]
        ctx = scenarios.Context(server, self.drivers[name], self.sizes, run)
        figures: dict[str, Any] = {"run": run}
        steps: list[tuple[str, Any]] = [
            ("enqueue_one", scenarios.enqueue_one),
            ("drain1", lambda c: scenarios.bulk_and_drain(c, 1)),
            ("drain2", lambda c: scenarios.bulk_and_drain(c, 2)),
            ("pickup", scenarios.pickup),
        ]
        if entry["info"].get("priority"):
            steps.append(("critical", scenarios.critical))
        if self.args.scaling_only:
            steps = []
        if name == scaling.SYSTEM and not self.args.skip_scaling:
            steps.append(("scaling", lambda c: scaling.run(c, self.scaling_sizes, _log)))
        for step, fn in steps:
            started = time.monotonic()
            try:
                figures.update(fn(ctx))
                _log(f"{name} run {run}: {step} done in {time.monotonic() - started:.0f} s")
            except CommandError as exc:
                entry["errors"][step] = str(exc).splitlines()[0][:400]
                _log(f"{name} run {run}: {step} FAILED: {exc}")
            except Exception as exc:  # noqa: BLE001 - one broken step must not end the matrix
                entry["errors"][step] = f"harness error: {type(exc).__name__}: {exc}"
                traceback.print_exc()
        entry["runs"].append(figures)

    def ceiling_run(self, server: RedisServer, run: int) -> None:
        if self.args.skip_ceiling:
            self.results["ceiling_error"] = "skipped (--skip-ceiling)"
            self.results["hop_error"] = "skipped (--skip-ceiling)"
            return
        try:
            requests = 20_000 if self.args.quick else 200_000
            self.results["ceiling_runs"].append(ceiling.measure(server, requests))
            _log("redis-benchmark ceiling measured")
        except CommandError as exc:
            self.results["ceiling_error"] = str(exc)
            _log(f"redis-benchmark FAILED: {exc}")
        self.hop_run(server, run)

    def hop_run(self, server: RedisServer, run: int) -> None:
        """The bare hand-off floor; each consumer variant fails on its own, like a ceiling."""
        figures: dict[str, Any] = {"run": run}
        for variant in hop.VARIANTS:
            log_path = self.log_dir / f"hop-{variant.key}-run{run}.log"
            try:
                figures[variant.key] = hop.measure(server, variant, self.sizes, log_path)
                p99 = figures[variant.key]["p99_ms"]
                _log(f"bare hand-off ({variant.key}) measured: p99 {p99:.2f} ms")
            except CommandError as exc:
                figures[variant.key] = {"error": str(exc).splitlines()[0][:400]}
                _log(f"bare hand-off ({variant.key}) FAILED: {exc}")
            except Exception as exc:  # noqa: BLE001 - a floor reading must not end the matrix
                figures[variant.key] = {"error": f"harness error: {type(exc).__name__}: {exc}"}
                traceback.print_exc()
        self.results["hop_runs"].append(figures)

    def summarize(self) -> None:
        conveyor = self.results["systems"].get(scaling.SYSTEM, {})
        self.results["scaling"] = scaling_report.summarize(conveyor.get("runs", []))
        for entry in self.results["systems"].values():
            if entry.get("status") == "ok":
                entry["summary"] = report.aggregate(entry)
                if not entry["summary"] and entry["errors"] and not self.args.scaling_only:
                    entry.update(
                        status="failed",
                        error="; ".join(f"{k}: {v}" for k, v in entry["errors"].items()),
                    )
        ceiling_summary: dict[str, Any] = {}
        for run in self.results["ceiling_runs"]:
            for key, row in run.items():
                agg = ceiling_summary.setdefault(
                    key, {"test": row["test"], "label": row["label"], "rps": [], "p50_ms": []}
                )
                agg["rps"].append(row["rps"])
                agg["p50_ms"].append(row["p50_ms"])
        for agg in ceiling_summary.values():
            agg["rps"] = summary(agg["rps"])
            agg["p50_ms"] = summary(agg["p50_ms"])
        self.results["ceiling_summary"] = ceiling_summary
        self.results["hop_summary"] = hop.summarize(self.results["hop_runs"])

    def main(self) -> int:
        wall = time.monotonic()
        s = self.sizes
        server = RedisServer(self.log_dir)
        try:
            self.results["meta"] = {
                "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "mode": "quick" if self.args.quick else "full",
                "scaling_only": self.args.scaling_only,
                "scaling_sizes": dataclasses.asdict(self.scaling_sizes),
                "runs": self.runs,
                "sizes": dataclasses.asdict(s),
                "sizes_text": (
                    f"enqueue one by one {s.enqueue_one:,} jobs; bulk enqueue, memory and each "
                    f"drain {s.jobs:,} no-op jobs (batches of {s.batch:,}; drains capped at "
                    f"{s.drain_cap_s:.0f} s); idle pickup {s.pickup_samples} samples; critical "
                    f"wait {s.critical_samples} samples behind {s.low_jobs:,} low jobs"
                ),
                "machine": _machine(),
                "python": sys.version.split()[0],
                "redis_version": server.version(),
                "redis_url": server.url,
                "argv": sys.argv[1:],
            }
            _log(f"redis-server on {server.url}; results in {self.out_dir}")
            for system in self.selected:
                self.prepare(system, server)
                self.save()
            for run in range(1, self.runs + 1):
                self.ceiling_run(server, run)
                # Systems take turns within each run, so a noisy minute on the shared machine
                # spreads over all of them instead of sinking one system's figures.
                for name in self.drivers:
                    self.run_system(name, server, run)
                    self.save()
        finally:
            server.stop()
            self.results["meta"]["wall_seconds"] = round(time.monotonic() - wall, 1)
            self.summarize()
            self.save()
            (self.out_dir / "results.md").write_text(report.render(self.results), encoding="utf-8")
        _log(f"done in {time.monotonic() - wall:.0f} s: {self.out_dir / 'results.md'}")
        return 0


def _on_sigterm(_signum: int, _frame: object) -> None:
    # SIGTERM takes the same clean-up path as Ctrl-C: workers and redis-server are ours to stop.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Bench(_args(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
