"""The harness side of the driver protocol: run commands, parse answers, start workers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from harness.procs import Background, CommandError, run, tail
from harness.systems import NODE_DIR, System


class DriverClient:
    def __init__(self, system: System, argv: list[str], redis_url: str, log_dir: Path) -> None:
        self.system = system
        self.argv = argv
        self.log_dir = log_dir
        env = dict(os.environ)
        # Drivers must see only their own environment's packages, never the harness's.
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(var, None)
        env.update(
            {
                "BENCH_REDIS_URL": redis_url,
                "BENCH_NODE_DIR": str(NODE_DIR),
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(system.env)
        self.env = env

    def call(self, *args: str | int | float, timeout: float) -> dict[str, Any]:
        argv = [*self.argv, *map(str, args)]
        done = run(argv, timeout=timeout, env=self.env)
        log = self.log_dir / f"{self.system.name}.driver.log"
        with log.open("a", encoding="utf-8") as fh:
            command = " ".join(map(str, args))
            fh.write(f"$ {command}  (exit {done.returncode}, {done.seconds:.1f} s)\n")
            fh.write(done.stderr[-20000:])
        answer = _last_json(done.stdout)
        if answer is None:
            raise CommandError(
                f"`{args[0]}` gave no JSON answer (exit {done.returncode}): "
                + tail(done.stderr, 600)
            )
        if not answer.get("ok"):
            raise CommandError(f"`{args[0]}` failed: {answer.get('error', '?')}")
        return answer

    def start_worker(self, procs: int, lanes: list[str], tag: str) -> Background:
        return Background(
            [*self.argv, "worker", "--procs", str(procs), "--lanes", ",".join(lanes)],
            log_path=self.log_dir / f"{self.system.name}.worker-{tag}.log",
            env=self.env,
        )


def _last_json(stdout: str) -> dict[str, Any] | None:
    for raw in reversed(stdout.strip().splitlines()):
        line = raw.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                return parsed
    return None
