"""Where the demo's services are, as the orchestrator tells its worker processes.

The orchestrator knows the ports and directories only after it has started the services, so it
passes them to the ``conveyor worker`` processes in ``CONVEYOR_DEMO_*`` variables; the handlers
read them once, on their first job.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from conveyor.errors import ConfigError

ENV_PREFIX = "CONVEYOR_DEMO_"


@dataclass(frozen=True)
class DemoEnv:
    redis_url: str
    """Redis holding the ledger (the queue's own Redis)."""
    run: str
    """Run id: names the ledger keys and the PostgreSQL schema of this run."""
    smtp_port: int
    """Port of the SMTP server on 127.0.0.1 that receives the welcome emails."""
    webhook_url: str
    """Base URL of the customers' webhook endpoint, ending before ``/<customer>/...``."""
    database_url: str
    """PostgreSQL holding the tables the exports read."""
    schema: str
    """PostgreSQL schema of those tables."""
    output_dir: str
    """Directory the PDFs and CSV files are written to."""

    def to_environ(self) -> dict[str, str]:
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> DemoEnv:
        try:
            raw = {f.name: environ[ENV_PREFIX + f.name.upper()] for f in fields(cls)}
            smtp_port = int(raw.pop("smtp_port"))
            return cls(smtp_port=smtp_port, **raw)
        except (KeyError, ValueError) as exc:
            raise ConfigError(
                f"demo handlers need the {ENV_PREFIX}* variables `conveyor demo` sets: {exc}"
            ) from exc


@functools.cache
def current() -> DemoEnv:
    """This worker process's settings, read on first use."""
    return DemoEnv.from_environ(os.environ)
