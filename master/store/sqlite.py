"""The store in one SQLite file (WAL), the master's default.

Every method is synchronous and is called from one worker thread at a time (``StoreThread``),
so the event loop never blocks on disk. The statements live in one module per concern; this
class puts them together over one connection and brings the schema up to date on open.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .migrate import applied, migrate
from .sqlite_cluster import ClusterSQL
from .sqlite_fleet import FleetSQL
from .sqlite_releases import ReleasesSQL
from .sqlite_runs import RunsSQL
from .sqlite_schedules import SchedulesSQL

#: the file in the master's data dir
FILENAME = "master.db"


class SQLiteStore(FleetSQL, RunsSQL, SchedulesSQL, ReleasesSQL, ClusterSQL):
    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (what "kill the master" tests); only a
        # power cut can lose the last commits.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        #: schema versions this open applied (none when the data dir was up to date)
        self.migrated = migrate(self.db)

    def close(self) -> None:
        self.db.close()

    # -- meta: small named values (the admin token's hash, the peer secret) -----------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)", (key, value))

    def init_meta(self, key: str, value: str) -> str:
        """``key``'s value, set to ``value`` first if it has none (of two racing, the first wins)."""
        self.db.execute("INSERT OR IGNORE INTO meta(k, v) VALUES(?, ?)", (key, value))
        return str(self.get_meta(key))

    def schema_versions(self) -> dict[int, float]:
        return applied(self.db)


def open_sqlite(data_dir: Path) -> SQLiteStore:
    return SQLiteStore(data_dir / FILENAME)
