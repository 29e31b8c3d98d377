"""The dashboard's live data: the events stream and a statistics poll, fanned out to browsers.

``Feed.follow_events`` reads the queue's events stream with plain XREAD from ``$``: no consumer
group, so the history writer's group and its trimming are untouched, and a dashboard that stops
leaves nothing behind. Each batch of events is published at once and wakes the poller, so depth
figures follow a change within one Redis round trip instead of waiting for the next tick.
``Feed.poll`` takes a snapshot (stats script, heartbeats, limited and paused groups) every
``poll_interval`` seconds and whenever events arrive, at most every ``MIN_POLL_GAP`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis
import redis.asyncio
from starlette.concurrency import run_in_threadpool

from conveyor.dashboard.activity import HISTORY_SECONDS, Activity, JobEvent
from conveyor.errors import ConveyorError
from conveyor.history.events import MalformedEntry, entry_rows
from conveyor.keys import PRIORITY_CLASSES
from conveyor.queue import ClassStats, Queue
from conveyor.workers import WorkerInfo, list_workers

log = logging.getLogger(__name__)

MIN_POLL_GAP = 0.1
"""Seconds between two event-triggered polls: a busy queue must not turn into a stats storm."""
READ_BLOCK_MS = 1000
READ_COUNT = 1000
RECENT_EVENTS = 30
"""Events sent to the page per batch (its ticker shows the latest few)."""
LIMITED_SHOWN = 50
"""Rate-limited groups listed per class."""
FIRST_POLL_WAIT = 3.0
"""Seconds a page connecting at start-up waits for the first statistics."""
SUBSCRIBER_BACKLOG = 200
"""Messages a slow browser may fall behind before it is cut off (its EventSource reconnects
and starts again from a fresh snapshot)."""


class Hub:
    """Fan-out of messages to every connected page."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self.subscribers.add(inbox)
        return inbox

    def unsubscribe(self, inbox: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.subscribers.discard(inbox)

    def publish(self, message: dict[str, Any]) -> None:
        for inbox in list(self.subscribers):
            try:
                inbox.put_nowait(message)
            except asyncio.QueueFull:
                self.subscribers.discard(inbox)
                # The slot freed by dropping one message carries the end-of-stream mark.
                inbox.get_nowait()
                inbox.put_nowait(None)


def _events_of(queue_name: str, entry_id: bytes, fields: dict[bytes, bytes]) -> list[JobEvent]:
    try:
        rows = entry_rows(queue_name, entry_id, fields)
    except MalformedEntry:
        log.warning("skipping malformed event entry %r", entry_id, extra={"event": "bad_entry"})
        return []
    return [
        JobEvent(r[1], r[5], r[6], r[7], r[8], r[9], r[10])  # ms, kind, id, type, class, n, detail
        for r in rows
    ]


@dataclass(frozen=True)
class _Reading:
    now_ms: int
    stats: list[ClassStats]
    workers: list[WorkerInfo]
    limited: list[dict[str, Any]]
    paused: list[str]
    limits: dict[str, str]


class Feed:
    def __init__(self, queue: Queue, events_client: redis.asyncio.Redis, poll_interval: float):
        self.queue = queue
        self.events_client = events_client
        self.poll_interval = poll_interval
        self.hub = Hub()
        self.activity = Activity()
        self.latest: dict[str, Any] = {"type": "stats", "redis_up": False, "error": "starting"}
        self.first_poll = asyncio.Event()
        self.depth: deque[tuple[int, dict[str, int]]] = deque(maxlen=HISTORY_SECONDS)
        self.changed = asyncio.Event()
        self._rates: tuple[int, dict[str, dict[str, float | None]]] = (-1, {})

    # -- the events stream -----------------------------------------------------------------------

    async def follow_events(self) -> None:
        stream = self.queue.keys.events
        last = "$"
        failing = False
        while True:
            try:
                reply = await self.events_client.xread(
                    {stream: last}, count=READ_COUNT, block=READ_BLOCK_MS
                )
            except redis.RedisError as exc:
                if not failing:
                    log.warning("event stream unreadable: %s", exc, extra={"event": "stream_down"})
                failing = True
                await asyncio.sleep(1)
                continue
            if failing:
                log.info("event stream readable again", extra={"event": "stream_up"})
                failing = False
            for _, entries in cast(list[tuple[bytes, list[Any]]], reply or []):
                last = entries[-1][0].decode()
                self._take(entries)

    def _take(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        batch: list[JobEvent] = []
        for entry_id, fields in entries:
            batch.extend(_events_of(self.queue.keys.queue, entry_id, fields))
        for event in batch:
            self.activity.record(event)
        self.hub.publish(
            {
                "type": "events",
                "events": [e.as_json() for e in batch[-RECENT_EVENTS:]],
                "totals": self.activity.total_counts(),
            }
        )
        self.changed.set()

    # -- the statistics poll ---------------------------------------------------------------------

    async def poll(self) -> None:
        while True:
            self.changed.clear()
            started = time.monotonic()
            try:
                reading = await run_in_threadpool(self._read)
            except (ConveyorError, redis.RedisError) as exc:
                self.latest = {"type": "stats", "redis_up": False, "error": str(exc)}
            except Exception as exc:  # one bad reading must not end the live view
                log.exception("dashboard poll failed", extra={"event": "poll_failed"})
                self.latest = {"type": "stats", "redis_up": False, "error": repr(exc)}
            else:
                self.latest = self._compose(reading)
            self.first_poll.set()
            self.hub.publish(self.latest)
            await asyncio.sleep(max(0.0, MIN_POLL_GAP - (time.monotonic() - started)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), self.poll_interval)

    def _read(self) -> _Reading:
        """Everything the page shows from Redis (blocking: runs in a thread)."""
        now_ms, stats = self._now_and_stats()
        return _Reading(
            now_ms=now_ms,
            stats=stats,
            workers=list_workers(self.queue.client, self.queue.keys),
            limited=self._limited_groups(now_ms),
            paused=sorted(self.queue.paused_groups()),
            limits=self.queue.rate_limits(),
        )

    def _compose(self, reading: _Reading) -> dict[str, Any]:
        """The ``stats`` message; runs on the event loop, which alone touches ``activity``."""
        now_ms = reading.now_ms
        second = now_ms // 1000
        if self._rates[0] != second:
            # Percentiles sort up to MAX_WAIT_SAMPLES waits per class: once a second is enough.
            self._rates = (second, {c: self.activity.rates(now_ms, c) for c in PRIORITY_CLASSES})
        message: dict[str, Any] = {
            "type": "stats",
            "redis_up": True,
            "at": now_ms / 1000,
            "classes": [
                {**asdict(row), "backlog": row.backlog, **self._rates[1].get(row.priority, {})}
                for row in reading.stats
            ],
            "workers": [asdict(w) for w in reading.workers],
            "limited": reading.limited,
            "paused": reading.paused,
            "limits": reading.limits,
            "totals": self.activity.total_counts(),
        }
        if not self.depth or self.depth[-1][0] != second:
            # Charts move once a second; sending them with every event-driven poll would
            # multiply the traffic for nothing a person could see.
            self.depth.append((second, {row.priority: row.backlog for row in reading.stats}))
            message["charts"] = self.charts(now_ms)
        return message

    def _now_and_stats(self) -> tuple[int, list[ClassStats]]:
        seconds, micros = self.queue.client.time()
        return seconds * 1000 + micros // 1000, self.queue.stats()

    def _limited_groups(self, now_ms: int) -> list[dict[str, Any]]:
        """Groups whose rate limit holds them back now, with the moment they may run again.

        A group waiting for its limit sits in its class's ready set scored in the future
        (``claim.lua``); that is exactly what the stats script counts as limited.
        """
        pipe = self.queue.client.pipeline(transaction=False)
        for priority in PRIORITY_CLASSES:
            pipe.zrangebyscore(
                self.queue.keys.ready(priority),
                now_ms + 1,
                "+inf",
                start=0,
                num=LIMITED_SHOWN,
                withscores=True,
            )
        out = []
        for priority, rows in zip(PRIORITY_CLASSES, pipe.execute(), strict=True):
            for group, score in rows:
                out.append({"group": group.decode(), "priority": priority, "until": score / 1000})
        return out

    def charts(self, now_ms: int) -> dict[str, Any]:
        return {
            "depth": [[second, backlog] for second, backlog in self.depth],
            "throughput": self.activity.series(now_ms),
        }

    async def welcome(self) -> dict[str, Any]:
        """What a page that has just connected needs: the latest stats with the full charts."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first_poll.wait(), FIRST_POLL_WAIT)
        return {**self.latest, "charts": self.charts(round(time.time() * 1000))}
