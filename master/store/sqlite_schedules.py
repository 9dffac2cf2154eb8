"""SQLite: schedules and the series of samples they produce."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from hcsdk.protocol.wire import loads

from .sqlite_base import SQLiteBase, js


class SchedulesSQL(SQLiteBase):
    def put_schedule(self, name: str, cmd: str, args: dict[str, Any], every: float, timeout: float,
                     targets: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO schedules(name, cmd, args, every, timeout, targets, created_at) "
                        "VALUES(?,?,?,?,?,?,?)", (name, cmd, js(args), every, timeout, js(targets), time.time()))

    def schedule(self, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM schedules WHERE name=?", (name,)).fetchone()
        return _schedule(row) if row else None

    def schedules(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT s.*, (SELECT COUNT(*) FROM samples m WHERE m.series=s.name) AS samples, "
            "(SELECT MAX(time) FROM samples m WHERE m.series=s.name) AS last_sample FROM schedules s ORDER BY name")
        return [_schedule(r) for r in rows]

    def schedule_specs(self) -> list[dict[str, Any]]:
        return [_schedule(r) for r in self.db.execute("SELECT * FROM schedules")]

    def delete_schedule(self, name: str) -> None:
        self.db.execute("DELETE FROM schedules WHERE name=?", (name,))

    def forget_samples(self, before: float) -> int:
        return self.db.execute("DELETE FROM samples WHERE time<?", (before,)).rowcount

    def series(self, name: str, since: float | None, until: float | None, limit: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT m.uuid, a.hostname, m.time, m.status, m.fields, m.error FROM samples m "
            "LEFT JOIN agents a ON a.uuid=m.uuid WHERE m.series=? AND m.time>=? AND m.time<=? "
            "ORDER BY m.time, m.uuid LIMIT ?", (name, since or 0.0, until or 1e13, limit))
        return [{**dict(r), "fields": loads(r["fields"])} for r in rows]

    def schedules_given(self, uuid: str) -> set[str]:
        """Names of every schedule the master ever sent ``uuid`` (its ``zy.schedule.set`` tasks):
        the only names a handshake may get cancelled, and the only series it may write samples to.
        The tasks table already is that record, so nothing new needs storing."""
        rows = self.db.execute(
            "SELECT DISTINCT json_extract(r.args, '$.name') FROM tasks t JOIN runs r ON r.id = t.run_id "
            "WHERE t.uuid=? AND r.cmd='zy.schedule.set'", (uuid,))
        return {r[0] for r in rows if isinstance(r[0], str)}


def _schedule(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["args"], out["targets"] = loads(out["args"]), loads(out["targets"])
    return out
