"""The dashboard's settings, read from ``CONVEYOR_DASHBOARD_*`` (and the shared Redis, queue and
PostgreSQL variables) at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.config import _FromEnv, setting
from conveyor.errors import ConfigError

MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class DashboardSettings(_FromEnv):
    """How one ``conveyor dashboard`` serves."""

    token: str = setting(
        "",
        f"Secret that logs in to the dashboard and its API; at least {MIN_TOKEN_LENGTH} chars.",
        env="CONVEYOR_DASHBOARD_TOKEN",
    )
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis URL.", env="REDIS_URL")
    queue: str = setting("default", "Queue name.", env="CONVEYOR_QUEUE")
    database_url: str = setting(
        "", "PostgreSQL holding the task history; empty: no history panel.", env="DATABASE_URL"
    )
    host: str = setting("127.0.0.1", "Address to listen on.", env="CONVEYOR_DASHBOARD_HOST")
    port: int = setting(8089, "Port to listen on.", env="CONVEYOR_DASHBOARD_PORT")
    poll_interval: float = setting(
        1.0,
        "Seconds between queue statistics polls (events also trigger one).",
        env="CONVEYOR_DASHBOARD_POLL",
    )
    origins: tuple[str, ...] = setting(
        (),
        "Extra origins (scheme://host[:port]) allowed to post actions, e.g. behind a proxy.",
        env="CONVEYOR_DASHBOARD_ORIGINS",
    )
    secure_cookie: bool = setting(
        False,
        "Mark the session cookie Secure (set when the dashboard is served over HTTPS).",
        env="CONVEYOR_DASHBOARD_SECURE_COOKIE",
    )
    session_hours: float = setting(
        12.0, "Hours a login lasts.", env="CONVEYOR_DASHBOARD_SESSION_HOURS"
    )

    def __post_init__(self) -> None:
        if len(self.token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"CONVEYOR_DASHBOARD_TOKEN must be set, at least {MIN_TOKEN_LENGTH} characters"
            )
        if self.poll_interval <= 0 or self.session_hours <= 0:
            raise ConfigError("poll interval and session hours must be > 0")
