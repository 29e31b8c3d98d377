"""The PostgreSQL tables the CSV exports read: customers' orders, per sub-account.

The orchestrator creates and fills them in a schema of its own (dropped at the end, so a
``DATABASE_URL`` that points at a real database is left as it was); the export handler reads
them through a small per-process connection pool.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from conveyor.demo.scenario import CUSTOMERS

ORDERS_PER_ACCOUNT = 25
EXPORT_COLUMNS = ("id", "placed_at", "sku", "quantity", "amount_cents")


def create(url: str, schema: str) -> int:
    """Create and fill the schema's tables; returns the number of orders."""
    name = sql.Identifier(schema)
    orders = sql.Identifier(schema, "orders")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(name))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigserial PRIMARY KEY, customer text NOT NULL, "
                "account int NOT NULL, placed_at timestamptz NOT NULL, sku text NOT NULL, "
                "quantity int NOT NULL, amount_cents int NOT NULL)"
            ).format(orders)
        )
        for customer in CUSTOMERS:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (customer, account, placed_at, sku, quantity, amount_cents) "
                    "SELECT %s, a, now() - random() * interval '30 days', "
                    "'SKU-' || (1 + (random() * 499)::int), 1 + (random() * 9)::int, "
                    "(100 + random() * 99900)::int "
                    "FROM generate_series(0, %s - 1) a, generate_series(1, %s) n"
                ).format(orders),
                (customer.name, customer.accounts, ORDERS_PER_ACCOUNT),
            )
        conn.execute(sql.SQL("CREATE INDEX ON {} (customer, account)").format(orders))
        conn.execute(sql.SQL("ANALYZE {}").format(orders))
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(orders)).fetchone()
    return int(row[0]) if row else 0


def drop(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def export_query(schema: str) -> sql.Composed:
    return sql.SQL("SELECT {} FROM {} WHERE customer = %s AND account = %s ORDER BY id").format(
        sql.SQL(", ").join(map(sql.Identifier, EXPORT_COLUMNS)), sql.Identifier(schema, "orders")
    )


class Connections:
    """At most ``size`` connections per worker process, however many handler threads run:
    PostgreSQL's connection limit is shared by every worker process."""

    def __init__(self, url: str, size: int = 8) -> None:
        self.url = url
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            try:
                yield conn
            except psycopg.Error:
                conn.close()
                raise
            if conn.closed:
                return
            self._idle.put(conn)
