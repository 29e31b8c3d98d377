"""Log set-up for every Conveyor process: plain text for people, JSON lines for clusters.

Modules log through ``logging.getLogger(__name__)`` with lazy ``%`` arguments and a stable
``event`` name in ``extra``; the JSON format carries that name and any ``job_id``.
"""

from __future__ import annotations

import logging
import sys

import orjson

_EXTRA_FIELDS = ("event", "job_id", "queue", "taskqueue", "priority")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry).decode()
        except TypeError:
            # A lone surrogate (a job id or payload text from a foreign client): orjson refuses
            # it, and a log line that is dropped is worse than one that is escaped.
            return orjson.dumps({k: _escaped(v) for k, v in entry.items()}).decode()


def _escaped(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
