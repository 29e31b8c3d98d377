"""Subprocess helpers: every child gets its own process group and a deadline.

Peers spawn their own children (prefork pools, supervisors), so stopping only the direct
child would leave orphans consuming from Redis and skewing the next scenario. Each child
therefore leads a fresh session, and stopping it signals that whole group by its id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from harness import proctree


class CommandError(RuntimeError):
    """A child failed, timed out, or answered something unusable."""


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _kill_group(proc: subprocess.Popen[str], sig: int) -> None:
    # The group id equals the pid we started, so this only ever reaches our own children.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin_text: str | None = None,
) -> Finished:
    """Run to completion or kill the whole group at the deadline."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin_text, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc, signal.SIGKILL)
        out, err = proc.communicate()
        raise CommandError(
            f"timed out after {timeout:.0f} s: {' '.join(argv[:4])}…\n{_tail(err)}"
        ) from exc
    finally:
        # A clean exit can still leave grandchildren behind in the group.
        _kill_group(proc, signal.SIGKILL)
    return Finished(proc.returncode, out, err, time.monotonic() - started)


class Background:
    """A long-running child (a worker, redis-server) with output going to a log file."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = log_path.open("a", encoding="utf-8")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, then SIGKILL whatever is left after `grace` seconds."""
        # Some workers move children into a session of their own (RQ's work horses call
        # setsid), out of reach of the group signal; remember every descendant by pid.
        seen = set(proctree.descendants(self.proc.pid))
        if self.alive():
            _kill_group(self.proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        seen.update(proctree.descendants(self.proc.pid))
        # Children of a supervisor may outlive it; the group id still names them.
        _kill_group(self.proc, signal.SIGKILL)
        seen.discard(self.proc.pid)
        for pid in seen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return _tail(self.log_path.read_text(encoding="utf-8", errors="replace"), chars)
        except OSError:
            return ""


def _tail(text: str, chars: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= chars else "…" + text[-chars:]


def tail(text: str, chars: int = 1500) -> str:
    return _tail(text, chars)
