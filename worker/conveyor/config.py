"""Settings, one typed object per component, read from ``CONVEYOR_*`` variables at start-up.

Each field documents its meaning, unit and default; the CLI's ``--help`` names the variable.
Nothing reads the environment at import time.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self, get_type_hints

from conveyor.errors import ConfigError
from conveyor.keys import PRIORITY_CLASSES

ENV_PREFIX = "CONVEYOR_"


def setting(default: Any, doc: str, *, env: str | None = None) -> Any:
    """A settings field with its documentation; ``env`` overrides the derived variable name."""
    return field(default=default, metadata={"doc": doc, "env": env})


class _FromEnv:
    """Mixin: build a settings dataclass from the environment, with clear errors."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
                continue
            name = env_name(f)
            if name in environ:
                values[f.name] = _parse(name, environ[name], hints[f.name])
        return cls(**values)


def env_name(f: Any) -> str:
    return str(f.metadata.get("env") or ENV_PREFIX + f.name.upper())


def _parse(name: str, raw: str, hint: Any) -> Any:
    try:
        if hint in (int, "int"):
            return int(raw)
        if hint in (float, "float"):
            return float(raw)
        if hint in (bool, "bool"):
            if raw.lower() not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes", "on"}
        if hint == tuple[str, ...]:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError as exc:
        kind = {int: "whole number", float: "number", bool: "yes/no value"}.get(
            {"int": int, "float": float, "bool": bool}.get(hint, hint), str(hint)
        )
        setting_name = name.removeprefix(ENV_PREFIX).lower().replace("_", "-")
        raise ConfigError(f"{raw!r} is not a valid {kind} for --{setting_name} / {name}") from exc


@dataclass(frozen=True)
class QueueConfig:
    """Queue-wide bounds stored in Redis (``config`` hash), shared by every process."""

    done_retention: float = 0.0
    """Seconds a finished job's record stays in Redis; 0 deletes it at once (history is in
    PostgreSQL)."""
    dead_max: int = 100_000
    """Most dead letters kept; the oldest are purged beyond it."""
    dead_retention: float = 7 * 24 * 3600.0
    """Seconds a dead letter is kept before it is purged."""
    events_max: int = 1_000_000
    """Approximate cap of the event stream, bounding Redis memory if the history writer is down."""
    starvation_bound: float = 10.0
    """Seconds a lower class may wait behind busy higher classes before it gets one job (B22)."""

    def to_redis(self) -> dict[str, int]:
        return {
            "done_ttl_ms": round(self.done_retention * 1000),
            "dead_max": self.dead_max,
            "dead_ttl_ms": round(self.dead_retention * 1000),
            "events_max": self.events_max,
            "starvation_ms": round(self.starvation_bound * 1000),
        }


@dataclass(frozen=True)
class WorkerSettings(_FromEnv):
    """How one ``conveyor worker`` runs."""

    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL.", env="REDIS_URL")
    database_url: str = setting(
        "",
        "PostgreSQL URL for task history; empty disables the history writer.",
        env="DATABASE_URL",
    )
    history_batch: int = setting(500, "Most event stream entries stored per history transaction.")
    history_claim_idle: float = setting(
        60.0,
        "Seconds a history batch may stay unacknowledged before another writer takes it over.",
    )
    schedules: str = setting(
        "", "YAML file of recurring jobs to schedule; empty: only those declared in code."
    )
    queue: str = setting("default", "Queue name (all its keys share one Redis hash tag).")
    classes: tuple[str, ...] = setting(
        PRIORITY_CLASSES, "Priority classes this worker claims, comma-separated."
    )
    concurrency: int = setting(16, "Jobs run at once per worker process.")
    processes: int = setting(1, "Worker processes the supervisor keeps running.")
    grace: float = setting(
        25.0, "Seconds running jobs may finish after SIGTERM before they are handed back."
    )
    lease_ttl: float = setting(30.0, "Seconds a lease lasts without a heartbeat.")
    heartbeat: float = setting(0.0, "Seconds between lease extensions; 0 means lease_ttl / 3.")
    sweep_interval: float = setting(1.0, "Seconds between recoveries of expired leases.")
    claim_batch: int = setting(64, "Most jobs leased per claim round trip.")
    kill_grace: float = setting(
        3.0, "Seconds a timed-out sync handler gets before its process is recycled."
    )
    import_path: tuple[str, ...] = setting(
        (), "Modules to import for their @task handlers, comma-separated.", env="CONVEYOR_IMPORT"
    )
    worker_name: str = setting(
        "", "Name in heartbeats, before ':<pid>'; defaults to the pod name, else the host name."
    )
    pod_name: str = setting("", "Kubernetes pod name (downward API).", env="POD_NAME")
    instance: str = setting("", "Set by the supervisor: the tag that ends its processes' ids.")
    metrics_port: int = setting(0, "Port of the Prometheus and health endpoint; 0 disables it.")
    metrics_host: str = setting(
        "0.0.0.0",
        "Address the metrics and health endpoint binds.",
    )
    log_format: str = setting("text", "Log format: text or json.")
    log_level: str = setting("INFO", "Log level.")

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in PRIORITY_CLASSES]
        if unknown or not self.classes:
            raise ConfigError(
                f"classes must be among {', '.join(PRIORITY_CLASSES)}, got {', '.join(unknown)}"
            )
        for name in ("concurrency", "processes", "claim_batch", "history_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.lease_ttl <= 0 or self.grace < 0 or self.sweep_interval <= 0:
            raise ConfigError("lease_ttl and sweep_interval must be > 0, grace >= 0")
        if self.log_format not in ("text", "json"):
            raise ConfigError("log_format must be text or json")
        for name in ("grace", "lease_ttl", "heartbeat", "sweep_interval", "kill_grace"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number of seconds")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port must be between 0 and 65535")
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ConfigError(f"log_level {self.log_level!r} is not a logging level")

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat or self.lease_ttl / 3

    @property
    def identity(self) -> str:
        return self.identity_of(os.getpid())

    def identity_of(self, pid: int) -> str:
        """The identity of the worker process ``pid`` started with these settings. Lease tokens
        begin with it, and a supervisor recovers the leases of a dead process by it, so it must
        name one process: the pid tells apart the processes of one supervisor, the instance
        tag (random, set by the supervisor) supervisors whose pids repeat (one per container,
        each in its own PID namespace, under one worker or pod name)."""
        name = f"{self.worker_name or self.pod_name or socket.gethostname()}:{pid}"
        return f"{name}:{self.instance}" if self.instance else name
