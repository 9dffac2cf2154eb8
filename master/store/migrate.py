"""Numbered schema migrations for the SQLite store, applied when the master opens its data dir.

``migrations/NNNN_name.sql`` are applied in order, those not yet recorded in ``schema_version``,
all in one transaction with their records: a start upgrades the schema completely or not at
all, and a restart applies nothing twice. A data dir made before schema versions existed has
tables but no ``schema_version``; ``0001_initial.sql`` (today's schema, every statement
IF NOT EXISTS) adopts it, creating only what it lacks, and the fix-ups that code did at every
start (columns join_tokens gained later) run once after it.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import SchemaError

MIGRATIONS = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

#: columns join_tokens gained after its first release: added to older databases. A token from
#: before they existed is an agent token (kind 'agent'): it can no longer enroll a proxy.
_TOKEN_COLUMNS = {
    "kind": "TEXT NOT NULL DEFAULT 'agent'",
    "proxy_names": "TEXT NOT NULL DEFAULT '[]'",
    "max_uses": "INTEGER NOT NULL DEFAULT 0",
}


@dataclass(frozen=True, kw_only=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(folder: Path = MIGRATIONS) -> list[Migration]:
    """The migrations in ``folder``, by number; numbers must run 1, 2, 3... without gaps."""
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(version=int(match[1]), name=match[2], sql=path.read_text()))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise SchemaError(f"migrations in {folder} are not numbered 1..{len(found)}: {[m.version for m in found]}")
    return found


def applied(db: sqlite3.Connection) -> dict[int, float]:
    """version -> when it was applied (empty for a database that has no record)."""
    if not _has_table(db, "schema_version"):
        return {}
    return {int(r[0]): float(r[1]) for r in db.execute("SELECT version, applied_at FROM schema_version")}


def migrate(db: sqlite3.Connection, folder: Path = MIGRATIONS) -> list[int]:
    """Bring ``db`` (autocommit mode) to the newest schema; returns the versions applied now."""
    wanted = migrations(folder)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                   "applied_at REAL NOT NULL)")
        done = applied(db)
        if done and max(done) > len(wanted):
            raise SchemaError(f"the store has schema version {max(done)}; this master knows up to {len(wanted)}: "
                              "run the newer master")
        todo = [m for m in wanted if m.version not in done]
        for m in todo:
            for statement in statements(m.sql):
                db.execute(statement)
            _AFTER.get(m.version, _nothing)(db)
            db.execute("INSERT INTO schema_version(version, name, applied_at) VALUES(?,?,?)",
                       (m.version, m.name, time.time()))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return [m.version for m in todo]


def statements(script: str) -> list[str]:
    """A script's statements, one by one: ``executescript`` would commit the transaction the
    migrations run in. Lines that are only a comment are dropped."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        raise SchemaError(f"a migration ends inside a statement: {pending.strip()[:80]!r}")
    return out


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def _token_columns(db: sqlite3.Connection) -> None:
    """A data dir from before the columns of issue 13: 0001's CREATE left its join_tokens as it was."""
    have = {r[1] for r in db.execute("PRAGMA table_info(join_tokens)")}
    for column, decl in _TOKEN_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE join_tokens ADD COLUMN {column} {decl}")


def _nothing(db: sqlite3.Connection) -> None:
    pass


#: Python steps run right after a migration's SQL, in its transaction (what SQL alone cannot say)
_AFTER: dict[int, Callable[[sqlite3.Connection], None]] = {1: _token_columns}
