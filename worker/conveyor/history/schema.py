"""The history's PostgreSQL schema and statements, both shipped as SQL files in the package.

Migrations are ``migrations/NNNN_<name>.sql``, applied in number order and recorded in
``conveyor.schema_version``; statements are the named blocks of ``queries.sql``. Every writer
migrates at start-up, so the schema follows the newest Conveyor that has run against it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

import psycopg

from conveyor.errors import BackendError, BackendUnavailable

_MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")


class Migration(NamedTuple):
    version: int
    name: str
    body: bytes


@cache
def _statements() -> dict[str, bytes]:
    text = (resources.files(__package__) / "queries.sql").read_text()
    blocks = re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]
    named = {}
    for block in blocks:
        name, _, body = block.partition("\n")
        named[name.strip()] = body.strip().encode()
    return named


def statement(name: str) -> bytes:
    """The SQL of one named block of ``queries.sql`` (bytes: psycopg's type for query text
    that is not a literal in the code)."""
    return _statements()[name]


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration this version ships, oldest first."""
    folder = resources.files(__package__) / "migrations"
    found = []
    for item in folder.iterdir():
        match = _MIGRATION_FILE.fullmatch(item.name)
        if match:
            found.append(Migration(int(match[1]), match[2], item.read_bytes()))
    return tuple(sorted(found))


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the shipped migrations the database lacks; returns the versions applied.

    Everything happens in one transaction under an advisory lock, so concurrent starters queue
    behind the first and then find nothing left to do, and a failed migration changes nothing.
    Versions in the database that this code does not know (a newer Conveyor ran) are left be.
    """
    applied: list[int] = []
    with conn.transaction():
        conn.execute(statement("lock_schema"))
        conn.execute(statement("create_schema"))
        done = {row[0] for row in conn.execute(statement("schema_versions"))}
        for migration in migrations():
            if migration.version in done:
                continue
            conn.execute(migration.body)
            conn.execute(
                statement("record_version"),
                {"version": migration.version, "name": migration.name},
            )
            applied.append(migration.version)
    return applied


@contextlib.contextmanager
def translated(operation: str) -> Iterator[None]:
    """Raise psycopg's errors as Conveyor's (``BackendUnavailable`` when worth retrying)."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise BackendUnavailable(f"PostgreSQL unreachable during {operation}: {exc}") from exc
    except psycopg.Error as exc:
        raise BackendError(f"PostgreSQL error during {operation}: {exc}") from exc


def connect(database_url: str, *, connect_timeout: int = 5) -> psycopg.Connection[Any]:
    """A connection to a migrated history database, in autocommit mode."""
    with translated("connect"):
        conn = psycopg.connect(database_url, autocommit=True, connect_timeout=connect_timeout)
        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
    return conn
