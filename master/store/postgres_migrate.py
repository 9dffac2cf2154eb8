"""Numbered schema migrations for the PostgreSQL store, applied when a master opens it.

``migrations_pg/NNNN_name.sql`` (listed by migrate.py's ``migrations``) are applied in order,
those not yet recorded in ``schema_version``, in one transaction with their records, under a
transaction-scoped advisory lock: of several masters starting at once on one database, one
migrates and the others wait, then find nothing left to do. A store migrated by a newer master
(a version this code does not know) is refused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from .errors import SchemaError
from .migrate import migrations

MIGRATIONS_PG = Path(__file__).parent / "migrations_pg"

#: the advisory lock key the migrations are applied under (any bigint; this one spells "zymigr")
LOCK_KEY = 0x7A796D696772

_VERSIONS = ("CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, name text NOT NULL, "
             "applied_at double precision NOT NULL)")


def applied_pg(conn: psycopg.Connection[Any]) -> dict[int, float]:
    """version -> when it was applied (empty for a database that has no record)."""
    found = conn.execute("SELECT to_regclass('schema_version') AS t").fetchone()
    if found is None or _at(found, 0, "t") is None:
        return {}
    rows = conn.execute("SELECT version, applied_at FROM schema_version").fetchall()
    return {int(_at(r, 0, "version")): float(_at(r, 1, "applied_at")) for r in rows}


def migrate_pg(conn: psycopg.Connection[Any], folder: Path = MIGRATIONS_PG) -> list[int]:
    """Bring the database to the newest schema; returns the versions applied now. ``conn`` is
    in autocommit mode (the migrations run in a transaction of their own)."""
    wanted = migrations(folder)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(_VERSIONS)
        done = applied_pg(conn)
        if done and max(done) > len(wanted):
            raise SchemaError(f"the store has schema version {max(done)}; this master knows up to {len(wanted)}: "
                              "run the newer master")
        todo = [m for m in wanted if m.version not in done]
        for m in todo:
            # a script without parameters goes as one simple query: every statement, in order
            conn.execute(m.sql.encode())
            conn.execute("INSERT INTO schema_version(version, name, applied_at) VALUES(%s,%s,%s)",
                         (m.version, m.name, time.time()))
    return [m.version for m in todo]


def _at(row: Any, index: int, key: str) -> Any:
    """A column of a tuple row or a dict row (the runner takes either kind of connection)."""
    return row[key] if isinstance(row, dict) else row[index]
