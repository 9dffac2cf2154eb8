"""What the PostgreSQL store's parts share: the connection pool, its transactions, and the
helpers that turn Python values into what PostgreSQL takes.

Connections are in autocommit mode, so a lone statement is one round trip (no BEGIN/COMMIT);
writes that must land together use ``transaction()``. Several masters, and several worker
threads of one master, call the store at once: every transaction that inserts events for a run
locks that run's row first (``lock_runs``), so event ids are in commit order within a run and a
reader paging ``events_after`` by cursor never skips one committed late with a lower id.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from hcsdk.protocol.tasks import FINAL

from .sqlite_base import js, sql_list

__all__ = ["FINAL", "FINAL_SQL", "PostgresBase", "clean", "js", "sql_list"]

#: the final task statuses as an SQL list
FINAL_SQL = sql_list(FINAL)

Conn = psycopg.Connection[DictRow]


def clean(text: str) -> str:
    """A string an agent sent, fit for a text column: PostgreSQL refuses NUL characters, and a
    result it refuses would be resent for ever (SQLite keeps them; U+FFFD stands in here)."""
    return text if "\x00" not in text else text.replace("\x00", "\ufffd")


def clean_or_none(text: str | None) -> str | None:
    return None if text is None else clean(text)


#: the staging tables of batched writes, per connection: rows go in by COPY (the cheapest way in,
#: measured) and an UPDATE ... FROM or INSERT ... SELECT takes them from there; emptied by each commit
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS zy_starts (started_at float8, taskid text) ON COMMIT DELETE ROWS;"
    "CREATE TEMP TABLE IF NOT EXISTS zy_dones (status text, exit_code bigint, started_at float8, finished_at float8, "
    "error text, truncated text, taskid text) ON COMMIT DELETE ROWS;"
    "CREATE TEMP TABLE IF NOT EXISTS zy_samples (series text, uuid text, taskid text, seq int, time float8, "
    "status text, fields text, error text) ON COMMIT DELETE ROWS"
)


class PostgresBase:
    """A pool of autocommit connections with rows as dicts."""

    pool: ConnectionPool[Conn]
    #: connections whose staging tables exist (``staged``)
    _staging_made: weakref.WeakSet[Conn]

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """A pooled connection for one call. A connection error (PostgreSQL restarted, a
        failover) has the pool test its idle connections, so the calls after this failed one get
        fresh ones; the error still reaches the caller (the master's ingest then has agents
        resend)."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.OperationalError:
            with suppress(Exception):  # (the error to report is the one that failed the call)
                self.pool.check()
            raise

    @contextmanager
    def transaction(self, staging: bool = False) -> Iterator[Conn]:
        """A connection in a transaction, committed when the block ends without error; with
        ``staging``, its staging tables made first (``staged``)."""
        with self.connection() as conn:
            if staging:
                self.staged(conn)
            with conn.transaction():
                yield conn

    def one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        for attempt in (1, 2):
            try:
                with self.connection() as conn:
                    return conn.execute(sql, tuple(params)).fetchone()
            except psycopg.OperationalError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        # A read is tried again once on another connection: after a PostgreSQL restart every
        # pooled connection is dead, and the first call on each would fail (an SDK stream, the
        # API's token check) though the server is back. Writes are not: one may have committed.
        for attempt in (1, 2):
            try:
                with self.connection() as conn:
                    return conn.execute(sql, tuple(params)).fetchall()
            except psycopg.OperationalError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def write(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One statement on its own; the rows it touched."""
        with self.connection() as conn:
            return conn.execute(sql, tuple(params)).rowcount

    def staged(self, conn: Conn) -> Conn:
        """``conn`` with its staging tables made (once per connection: a temporary table lives as
        long as its session, and a connection the pool replaced is a new session). Outside any
        transaction, so that they are committed at once: made in one that rolled back they would
        be gone while the connection is still noted as having them."""
        if conn not in self._staging_made:
            conn.execute(_STAGING)
            self._staging_made.add(conn)
        return conn

    @staticmethod
    def copy_in(conn: Conn, table_columns: str, rows: Sequence[Sequence[Any]]) -> None:
        """``rows`` into ``table(columns)`` by COPY."""
        if rows:
            with conn.cursor().copy(f"COPY {table_columns} FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)

    @staticmethod
    def lock_runs(conn: Conn, run_ids: Iterable[str]) -> None:
        """Lock these runs' rows until the transaction ends, in id order (two writers locking in
        the same order cannot deadlock): the events it inserts next take ids only after every
        earlier writer of those runs has committed."""
        ids = sorted(set(run_ids))
        if ids:
            conn.execute("SELECT 1 FROM runs WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,))


#: TCP keepalives unless the URL sets its own: a PostgreSQL that vanishes without closing its
#: connections (a failover, a cut link) fails the calls waiting on it within about 20 s, instead
#: of the system's two hours
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 5, "keepalives_count": 3}

#: server-side limits of every pooled connection. A master frozen (SIGSTOP, a VM paused) or cut
#: off inside a transaction holds its row locks until its session ends: the server ends an idle
#: transaction after 30 s, and a statement of another master waits on a lock at most 10 s (then
#: fails, and its caller retries: agents resend) instead of queueing for ever behind it and using
#: up that master's pool. No statement of the pool runs long: the biggest, a blob piece or an
#: ingest batch, takes well under a second; migrate-store's bulk COPY has its own connection.
SESSION_LIMITS = {"idle_in_transaction_session_timeout": "30s", "lock_timeout": "10s", "statement_timeout": "60s"}


def session_options(given: dict[str, Any]) -> str:
    """libpq ``options`` with ``SESSION_LIMITS``; the URL's own ``options`` come after, so a
    setting it names wins."""
    ours = " ".join(f"-c {k}={v}" for k, v in SESSION_LIMITS.items())
    return f"{ours} {given['options']}" if given.get("options") else ours


def open_pool(url: str, size: int) -> ConnectionPool[Conn]:
    """``size`` autocommit connections at most, one at least, rows as dicts, each with TCP
    keepalives and ``SESSION_LIMITS``."""
    given = conninfo_to_dict(url)
    kwargs: dict[str, Any] = {k: v for k, v in KEEPALIVES.items() if k not in given}
    kwargs["options"] = session_options(given)
    pool: ConnectionPool[Conn] = ConnectionPool(
        url, min_size=1, max_size=size, open=False, timeout=15.0, name="zy-store",
        kwargs={**kwargs, "autocommit": True, "row_factory": dict_row}, connection_class=psycopg.Connection[DictRow],
    )
    pool.open(wait=True, timeout=15.0)
    return pool
