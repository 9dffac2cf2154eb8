"""The store in PostgreSQL, shared by several masters (issue 15).

Every method is synchronous and runs in a worker thread (``StoreThread``), several at a time:
the class puts the statements of each concern together over one connection pool and brings
the schema up to date on open (postgres_migrate.py).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row, tuple_row

from .postgres_base import open_pool
from .postgres_blobs import PostgresBlobsSQL
from .postgres_cluster import PostgresClusterSQL
from .postgres_fleet import PostgresFleetSQL
from .postgres_migrate import applied_pg, migrate_pg
from .postgres_releases import PostgresReleasesSQL
from .postgres_runs import PostgresRunsSQL
from .postgres_schedules import PostgresSchedulesSQL

#: connections per master: the most store calls a master runs at once (StoreThread's capacity)
POOL_SIZE = 4


def redact(url: str) -> str:
    """The URL without its password, fit for a message."""
    url = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


class PostgresStore(PostgresFleetSQL, PostgresRunsSQL, PostgresSchedulesSQL, PostgresReleasesSQL, PostgresClusterSQL,
                    PostgresBlobsSQL):
    def __init__(self, url: str, pool_size: int = POOL_SIZE):
        self.url = url
        #: how many calls may run at once (StoreThread reads it)
        self.concurrency = pool_size
        self._staging_made = weakref.WeakSet()
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=15) as conn:
                #: schema versions this open applied (none when the database was up to date)
                self.migrated = migrate_pg(conn)
            self.pool = open_pool(url, pool_size)
        except psycopg.OperationalError as err:  # (the pool's PoolTimeout is one)
            raise RuntimeError(f"cannot open the store at {redact(url)}: {err}".strip()) from err

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """What PostgresBlobsSQL reads through: a pooled (autocommit) connection with rows as
        tuples, given back to the pool with rows as dicts again."""
        with self.connection() as conn:
            plain = cast(psycopg.Connection[Any], conn)
            plain.row_factory = tuple_row
            try:
                yield plain
            finally:
                plain.row_factory = dict_row

    # -- meta: small named values -----------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.one("SELECT v FROM meta WHERE k=%s", (key,))
        return row["v"] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.write("INSERT INTO meta(k, v) VALUES(%s, %s) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (key, value))

    def init_meta(self, key: str, value: str) -> str:
        """``key``'s value, set to ``value`` first if it has none (of two racing, from any
        master, the first wins and both get its value)."""
        with self.connection() as conn:
            conn.execute("INSERT INTO meta(k, v) VALUES(%s, %s) ON CONFLICT DO NOTHING", (key, value))
            row = conn.execute("SELECT v FROM meta WHERE k=%s", (key,)).fetchone()
        assert row is not None  # inserted just above, or there already
        return str(row["v"])

    def schema_versions(self) -> dict[int, float]:
        with self.connection() as conn:
            return applied_pg(conn)


def open_postgres(url: str) -> PostgresStore:
    return PostgresStore(url)
