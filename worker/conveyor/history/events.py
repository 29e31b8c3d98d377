"""Stream entries of the ``events`` stream, expanded into one history row per job event.

The scripts write one entry per event kind per call (see ``emit``/``finish`` in
``lua/_prelude.lua``): field ``e`` is the kind, field ``d`` a JSON array of
``[job id, job type, class, attempt, detail]``, and the entry id's milliseconds are the time.
Jobs queued ready by one call come as runs of consecutive ids instead: kind ``queued_run``,
``d`` an array of ``[created ms, first sequence number, count, job type, class]`` (numbers as
strings), each expanding into ``count`` rows of kind ``queued``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

EVENT_KINDS = frozenset(
    {
        "queued",
        "started",
        "retried",
        "completed",
        "dead_lettered",
        "replayed",
        "handed_back",
        "purged",
    }
)

COLUMNS = (
    "queue",
    "entry_ms",
    "entry_seq",
    "position",
    "at",
    "kind",
    "job_id",
    "job_type",
    "priority",
    "attempt",
    "detail",
)
"""Columns of ``conveyor.job_event`` in the order of the tuples ``entry_rows`` returns."""

Row = tuple[str, int, int, int, datetime, str, str, str, str, int, str]


QUEUED_RUN = "queued_run"


class MalformedEntry(ValueError):
    """A stream entry that is not an event record; it cannot become history."""


def _expand_runs(entry_id: bytes | str, runs: list[Any]) -> list[list[Any]]:
    """``queued_run`` records as the per-job events they stand for (ids as enqueue makes them:
    creation ms and sequence number, fixed width)."""
    events: list[list[Any]] = []
    for run in runs:
        try:
            created_ms, first, count, job_type, priority = run
            created_ms, first, count = int(created_ms), int(first), int(count)
        except (TypeError, ValueError) as exc:
            raise MalformedEntry(f"entry {entry_id!r} run {run!r:.200}") from exc
        if count < 0 or count > 1_000_000:
            raise MalformedEntry(f"entry {entry_id!r} run of {count} jobs")
        events.extend(
            [f"{created_ms:013d}-{seq:016d}", job_type, priority, 0, ""]
            for seq in range(first, first + count)
        )
    return events


def parse_entry_id(entry_id: bytes | str) -> tuple[int, int]:
    """``b'1700000000000-3'`` -> ``(1700000000000, 3)``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    # cjson turns a missing field into false; PostgreSQL text cannot hold NUL.
    if value is None or value is False:
        return ""
    return str(value).replace("\x00", "")


def entry_rows(queue: str, entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> list[Row]:
    """The history rows of one stream entry, in the order the script emitted them."""
    try:
        ms, seq = parse_entry_id(entry_id)
        kind = fields[b"e"].decode()
        events = orjson.loads(fields[b"d"])
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise MalformedEntry(f"entry {entry_id!r} is not an event record: {exc}") from exc
    if kind == QUEUED_RUN and isinstance(events, list):
        events = _expand_runs(entry_id, events)
        kind = "queued"
    if kind not in EVENT_KINDS or not isinstance(events, list):
        raise MalformedEntry(f"entry {entry_id!r} has unknown kind {kind!r} or no event list")
    at = datetime.fromtimestamp(ms / 1000, UTC)
    rows: list[Row] = []
    for position, event in enumerate(events):
        if not isinstance(event, list) or len(event) != 5:
            raise MalformedEntry(f"entry {entry_id!r} event {position} is {event!r}")
        job_id, job_type, priority, attempt, detail = event
        try:
            attempt_number = int(attempt or 0)
        except (TypeError, ValueError) as exc:
            raise MalformedEntry(f"entry {entry_id!r} attempt {attempt!r}") from exc
        rows.append(
            (
                queue,
                ms,
                seq,
                position,
                at,
                kind,
                _text(job_id),
                _text(job_type),
                _text(priority),
                attempt_number,
                _text(detail),
            )
        )
    return rows
