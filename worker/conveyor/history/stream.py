"""Keeping the events stream bounded without losing what a reader still needs.

Entries are trimmed only below what every consumer group has acknowledged, so a second reader
(an analytics group, say) that lags holds the stream for itself. If no reader keeps up, the
scripts' own cap (``QueueConfig.events_max``) is the last bound; ``StreamGauge`` warns while
the stream is still well short of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from conveyor.config import QueueConfig
from conveyor.history.events import parse_entry_id
from conveyor.keys import Keyspace

log = logging.getLogger(__name__)

WARN_FILL = 0.8
"""Share of the cap at which the stream length is worth a warning."""
CLEAR_FILL = 0.5
"""Share of the cap below which the warning is re-armed."""
IDLE_CONSUMER_MS = 3_600_000
"""A consumer with nothing pending and no read for this long belonged to a stopped writer."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def acknowledged_floor(client: redis.asyncio.Redis, stream: str) -> str | None:
    """The lowest entry id some consumer group still needs (pending or not yet delivered), as
    a MINID for XTRIM; None when the stream has no group, so nothing may be trimmed."""
    floor: tuple[int, int] | None = None
    for group in await client.xinfo_groups(stream):
        if int(group["pending"]) > 0:
            summary = await client.xpending(stream, group["name"])
            needed = parse_entry_id(summary["min"])
        else:
            # Everything up to last-delivered-id is acknowledged; keeping that one entry is
            # harmless and saves computing its successor.
            needed = parse_entry_id(group["last-delivered-id"])
        floor = needed if floor is None else min(floor, needed)
    return None if floor is None else f"{floor[0]}-{floor[1]}"


async def trim_acknowledged(
    client: redis.asyncio.Redis, stream: str, *, approximate: bool = True
) -> int:
    """Delete entries every consumer group has acknowledged; returns how many went.

    ``approximate`` lets Redis drop only whole internal nodes (cheap, may keep a few hundred
    acknowledged entries); never does it drop an entry at or above the floor.
    """
    floor = await acknowledged_floor(client, stream)
    if floor is None or floor == "0-0":
        return 0
    return int(await client.xtrim(stream, minid=floor, approximate=approximate))


async def forget_idle_consumers(
    client: redis.asyncio.Redis, stream: str, group: str, keep: str
) -> int:
    """Remove consumers of stopped writers (nothing pending, idle for an hour) so the group's
    consumer list does not grow with every restart; returns how many were removed."""
    removed = 0
    for consumer in await client.xinfo_consumers(stream, group):
        name = _text(consumer["name"])
        if (
            name != keep
            and int(consumer["pending"]) == 0
            and int(consumer["idle"]) > IDLE_CONSUMER_MS
        ):
            await client.xgroup_delconsumer(stream, group, name)
            removed += 1
    return removed


@dataclass
class StreamGauge:
    """Warns once when the stream nears its cap, and again only after it has drained."""

    keys: Keyspace
    warned: bool = False

    async def check(self, client: redis.asyncio.Redis) -> tuple[int, int]:
        """Returns (length, cap)."""
        raw = await client.hget(self.keys.config, "events_max")
        cap = int(raw) if raw else QueueConfig().events_max
        length = int(await client.xlen(self.keys.events))
        if not self.warned and length >= cap * WARN_FILL:
            self.warned = True
            log.warning(
                "event stream of queue %s holds %d entries, %.0f%% of its cap %d: history is "
                "falling behind and entries beyond the cap will be dropped unwritten",
                self.keys.queue,
                length,
                100 * length / cap,
                cap,
                extra={"event": "history_stream_near_cap", "queue": self.keys.queue},
            )
        elif self.warned and length < cap * CLEAR_FILL:
            self.warned = False
        return length, cap
