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

#: the most store calls a master runs at once through StoreThread (its capacity)
POOL_SIZE = 4
#: the share of ``concurrency`` master/blobs.py lets blob reads and puts take, in threads of
#: their own beside StoreThread's (as its STORE_BLOB_SHARE)
BLOB_SHARE = 0.5


def pool_size_for(concurrency: int) -> int:
    """Connections for ``concurrency`` StoreThread calls, the blob calls beside them and one
    spare (a call made outside both): a full StoreThread and blob downloads together must not
    wait for a connection (the pool's wait ends in an error after 15 s)."""
    return concurrency + max(1, int(concurrency * BLOB_SHARE)) + 1


_URL_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#]*")
_DSN_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def redact(url: str) -> str:
    """``url`` (a URL of any scheme, or a libpq ``key=value`` string) without its password, fit
    for a message or a log: the userinfo's password (which may hold ``@`` or ``:``) and a
    ``password=`` parameter become ``***``; everything else is kept as written."""
    if "://" not in url:
        return _DSN_PASSWORD.sub(r"\1***", url)
    scheme, rest = url.split("://", 1)
    # the userinfo ends at the LAST @ (a password may hold @ / ? #, a host never holds @; an
    # @ later in the query only makes this hide more than the password, never less)
    at = rest.rfind("@")
    if at >= 0:
        user = rest[:at].split(":", 1)[0]
        if ":" in rest[:at]:
            rest = f"{user}:***{rest[at:]}"
    return scheme + "://" + _URL_PASSWORD.sub(r"\1***", rest)


class PostgresStore(PostgresFleetSQL, PostgresRunsSQL, PostgresSchedulesSQL, PostgresReleasesSQL, PostgresClusterSQL,
                    PostgresBlobsSQL):
    def __init__(self, url: str, pool_size: int = POOL_SIZE):
        self.url = url
        #: how many calls may run at once through StoreThread (it reads this); the pool holds
        #: more (``pool_size_for``)
        self.concurrency = pool_size
        self._staging_made = weakref.WeakSet()
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=15) as conn:
                #: schema versions this open applied (none when the database was up to date)
                self.migrated = migrate_pg(conn)
            self.pool = open_pool(url, pool_size_for(pool_size))
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
