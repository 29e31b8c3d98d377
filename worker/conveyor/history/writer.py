"""Copying the events stream into PostgreSQL, from any number of writers at once.

Writers (one per worker process when ``DATABASE_URL`` is set, or ``conveyor history-writer``)
share the consumer group ``history``, so each entry is delivered to one of them. A batch is
copied into a staging table and inserted with ``ON CONFLICT DO NOTHING`` on (entry id,
position), then acknowledged only after the commit: an entry written twice (its writer died
between commit and XACK, or a slow writer's batch was claimed by another) is stored once.

The entries a writer read but has not yet stored stay pending in Redis under its name; when
the writer dies, another takes them over with XAUTOCLAIM once they have been idle for
``claim_idle`` seconds. While PostgreSQL (or Redis) is unreachable the writer keeps its batch,
retries with backoff and warns once per outage; nothing is lost unless the stream reaches the
cap of ``QueueConfig.events_max``, which ``StreamGauge`` warns about well before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from typing import Any

import psycopg
import redis.asyncio

from conveyor.config import WorkerSettings
from conveyor.connection import connect_async
from conveyor.errors import BackendError
from conveyor.history.events import MalformedEntry, Row, entry_rows
from conveyor.history.schema import connect, statement
from conveyor.history.stream import StreamGauge, forget_idle_consumers, trim_acknowledged
from conveyor.keys import Keyspace

log = logging.getLogger(__name__)

GROUP = "history"
"""The consumer group every history writer of a queue reads with."""

Entry = tuple[bytes, dict[bytes, bytes]]
_OUTAGES = (psycopg.Error, redis.RedisError, OSError, BackendError)


def _raise_if_cancelled() -> None:
    # redis-py's asyncio client can swallow a cancellation that lands while a command's socket
    # timeout is armed (seen with XREADGROUP BLOCK); this loop catches Redis errors and would
    # otherwise never stop. Same guard as in schedule.py.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class HistoryWriter:
    """Moves a queue's events into PostgreSQL; ``run`` until cancelled, or ``step`` by step."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keyspace,
        database_url: str,
        consumer: str,
        *,
        batch: int = 500,
        block: float = 1.0,
        claim_idle: float = 60.0,
        retry_cap: float = 30.0,
        maintenance_interval: float = 10.0,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.keys = keys
        self.stream = keys.events
        self.database_url = database_url
        self.consumer = consumer
        self.batch = batch
        self.retry_cap = retry_cap
        self.maintenance_interval = maintenance_interval
        self.entries_done = 0
        """Entries this writer stored (or found stored) and acknowledged."""
        self.rows_inserted = 0
        """Rows this writer's inserts added; lower than the events when another wrote them."""
        self._block_ms = round(block * 1000)
        self._claim_idle = claim_idle
        self._owns_client = owns_client
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._held: list[Entry] = []
        self._held_rows: list[Row] = []
        self._prepared = False
        self._own_backlog = True
        self._claim_cursor: bytes | str = "0-0"
        self._next_claim = 0.0
        self._next_maintenance = 0.0
        self._down_since: float | None = None
        self._gauge = StreamGauge(keys)

    # -- one batch -------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Migrate the schema and create the consumer group (both idempotent)."""
        await asyncio.to_thread(lambda: connect(self.database_url).close())
        try:
            await self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._prepared = True

    async def step(self) -> int:
        """Store one batch, the one held since a failed write first; returns entries done."""
        if not self._prepared:
            await self.prepare()
        if not self._held:
            self._held = await self._next_batch()
            self._held_rows = self._rows(self._held)
        if not self._held:
            return 0
        self.rows_inserted += await self._write(self._held_rows)
        await self.client.xack(self.stream, GROUP, *(entry_id for entry_id, _ in self._held))
        done = len(self._held)
        self.entries_done += done
        self._held = []
        return done

    async def _next_batch(self) -> list[Entry]:
        # A writer restarted under the same name first finishes what it had been given.
        if self._own_backlog:
            entries, any_pending = await self._read("0")
            if any_pending:
                return entries
            self._own_backlog = False
        claimed = await self._claim_stale()
        if claimed:
            return claimed
        entries, _ = await self._read(">", self._block_ms)
        return entries

    async def _read(self, start: str, block: int | None = None) -> tuple[list[Entry], bool]:
        # Typed as the union of both protocol versions; this client speaks RESP2.
        reply: Any = await self.client.xreadgroup(
            GROUP, self.consumer, {self.stream: start}, count=self.batch, block=block
        )
        raw: list[Entry] = reply[0][1] if reply else []
        lost = [entry_id for entry_id, fields in raw if not fields]
        if lost:
            await self.client.xack(self.stream, GROUP, *lost)
            self._report_lost(len(lost))
        return [entry for entry in raw if entry[1]], bool(raw)

    async def _claim_stale(self) -> list[Entry]:
        now = asyncio.get_running_loop().time()
        if now < self._next_claim:
            return []
        cursor, entries, deleted = await self.client.xautoclaim(
            self.stream,
            GROUP,
            self.consumer,
            round(self._claim_idle * 1000),
            start_id=self._claim_cursor,
            count=self.batch,
        )
        self._claim_cursor = cursor
        if _text(cursor) == "0-0":
            self._next_claim = now + self._claim_idle / 4
        if deleted:
            self._report_lost(len(deleted))
        return [entry for entry in entries if entry[1]]

    def _rows(self, entries: list[Entry]) -> list[Row]:
        rows: list[Row] = []
        for entry_id, fields in entries:
            try:
                rows.extend(entry_rows(self.keys.queue, entry_id, fields))
            except MalformedEntry as exc:
                log.error("skipping a stream entry: %s", exc, extra={"event": "history_malformed"})
        return rows

    async def _write(self, rows: list[Row]) -> int:
        if not rows:
            return 0
        conn = await self._connection()
        try:
            async with conn.transaction(), conn.cursor() as cur:
                async with cur.copy(statement("copy_staging")) as copy:
                    for row in rows:
                        await copy.write_row(row)
                await cur.execute(statement("insert_staged"))
                return max(cur.rowcount, 0)
        except psycopg.Error:
            await self._disconnect()
            raise

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True, connect_timeout=5
            )
            await conn.execute(statement("create_staging"))
            self._conn = conn
        return self._conn

    async def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None

    def _report_lost(self, count: int) -> None:
        log.warning(
            "%d events of queue %s left the stream before history stored them (stream cap "
            "reached or entries deleted); their history is lost",
            count,
            self.keys.queue,
            extra={"event": "history_events_lost", "queue": self.keys.queue},
        )

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Store events until cancelled, waiting out outages of PostgreSQL or Redis."""
        failures = 0
        try:
            while True:
                _raise_if_cancelled()
                await self._maintain_if_due()
                try:
                    await self.step()
                except _OUTAGES as exc:
                    # Redis lost the group (restart without persistence, FLUSHALL): recreate it.
                    if "NOGROUP" in str(exc):
                        self._prepared = False
                    self._down(exc)
                    failures += 1
                    cap = min(self.retry_cap, 0.1 * 2**failures)
                    await asyncio.sleep(random.uniform(cap / 2, cap))
                    continue
                if failures:
                    self._up()
                    failures = 0
        finally:
            await self.close()

    async def maintain(self) -> None:
        """Warn about the stream's length, trim what every group acknowledged, forget the
        consumers of writers that stopped long ago."""
        await self._gauge.check(self.client)
        await trim_acknowledged(self.client, self.stream)
        await forget_idle_consumers(self.client, self.stream, GROUP, self.consumer)

    async def _maintain_if_due(self) -> None:
        now = asyncio.get_running_loop().time()
        if not self._prepared or now < self._next_maintenance:
            return
        self._next_maintenance = now + self.maintenance_interval
        try:
            await self.maintain()
        except redis.RedisError as exc:
            log.debug("history stream maintenance failed: %s", exc)

    def _down(self, exc: BaseException) -> None:
        if self._down_since is not None:
            log.debug("history write failed again: %s", exc)
            return
        self._down_since = asyncio.get_running_loop().time()
        log.warning(
            "history writer cannot store events of queue %s (%s: %s); they stay pending in "
            "Redis and are retried with backoff",
            self.keys.queue,
            type(exc).__name__,
            str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            extra={"event": "history_unavailable", "queue": self.keys.queue},
        )

    def _up(self) -> None:
        since, self._down_since = self._down_since, None
        if since is not None:
            log.info(
                "history writer storing events again after %.1fs",
                asyncio.get_running_loop().time() - since,
                extra={"event": "history_resumed", "queue": self.keys.queue},
            )

    async def close(self) -> None:
        await self._disconnect()
        if self._owns_client:
            await self.client.aclose()


def writer_for(settings: WorkerSettings, block: float = 1.0) -> HistoryWriter:
    """The history writer of one worker process (or of ``conveyor history-writer``)."""
    client = connect_async(
        settings.redis_url,
        socket_timeout=block + 10,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=30,
    )
    return HistoryWriter(
        client,
        Keyspace(settings.queue),
        settings.database_url,
        settings.identity,
        batch=settings.history_batch,
        block=block,
        claim_idle=settings.history_claim_idle,
        owns_client=True,
    )


async def run_standalone(settings: WorkerSettings) -> None:
    """``conveyor history-writer``: one writer until SIGTERM or SIGINT."""
    task = asyncio.create_task(writer_for(settings).run(), name="history")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
