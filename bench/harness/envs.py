"""Build each peer's throwaway environment outside the repository, and reuse it when unchanged."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from harness.procs import CommandError, run, tail
from harness.systems import System

INSTALL_TIMEOUT = 900.0


def _spec(system: System) -> str:
    return json.dumps(
        {"requirements": list(system.requirements), "python": sys.version.split()[0]},
        sort_keys=True,
    )


def _is_current(marker: Path, spec: str) -> bool:
    try:
        return marker.read_text(encoding="utf-8") == spec
    except OSError:
        return False


def ensure(system: System, *, reinstall: bool = False) -> list[str]:
    """Return the argv prefix that runs this system's driver, installing it first if needed.

    Raises CommandError with the installer's own words when the registry or build refuses.
    """
    if system.kind == "repo":
        assert system.interpreter is not None
        if not system.interpreter.exists():
            raise CommandError(f"interpreter {system.interpreter} does not exist")
        return [str(system.interpreter), "-u", str(system.driver)]
    if system.kind == "node":
        return _ensure_node(system, reinstall=reinstall)
    return _ensure_venv(system, reinstall=reinstall)


def _ensure_venv(system: System, *, reinstall: bool) -> list[str]:
    env_dir = system.env_dir
    python = env_dir / "bin" / "python"
    marker = env_dir / ".bench-spec.json"
    spec = _spec(system)
    if reinstall or not _is_current(marker, spec):
        shutil.rmtree(env_dir, ignore_errors=True)
        env_dir.parent.mkdir(parents=True, exist_ok=True)
        _checked([sys.executable, "-m", "venv", str(env_dir)], "venv")
        _checked(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                *system.requirements,
            ],
            "pip install",
        )
        marker.write_text(spec, encoding="utf-8")
    # -u keeps driver stdout unbuffered so a killed driver still leaves its last words.
    return [str(python), "-u", str(system.driver)]


def _ensure_node(system: System, *, reinstall: bool) -> list[str]:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        raise CommandError("node/npm not found on PATH")
    prefix = system.env_dir
    marker = prefix / ".bench-spec.json"
    spec = _spec(system)
    if reinstall or not _is_current(marker, spec):
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "package.json").write_text(
            json.dumps({"name": "conveyor-bench-node", "private": True}), encoding="utf-8"
        )
        _checked(
            [npm, "install", "--no-audit", "--no-fund", "--save-exact", *system.requirements],
            "npm install",
            cwd=prefix,
        )
        marker.write_text(spec, encoding="utf-8")
    return [node, str(system.driver)]


def _checked(argv: list[str], what: str, cwd: Path | None = None) -> None:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    done = run(argv, timeout=INSTALL_TIMEOUT, env=env, cwd=cwd)
    if done.returncode != 0:
        raise CommandError(f"{what} failed (exit {done.returncode}): {tail(done.stderr, 800)}")
