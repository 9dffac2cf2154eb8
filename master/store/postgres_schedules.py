"""PostgreSQL: schedules and the series of samples they produce (as sqlite_schedules.py)."""

from __future__ import annotations

import time
from typing import Any

from hcsdk.protocol.wire import loads

from .postgres_base import PostgresBase, js


class PostgresSchedulesSQL(PostgresBase):
    def put_schedule(self, name: str, cmd: str, args: dict[str, Any], every: float, timeout: float,
                     targets: dict[str, Any]) -> None:
        self.write("INSERT INTO schedules(name, cmd, args, every, timeout, targets, created_at) "
                   "VALUES(%s,%s,%s,%s,%s,%s,%s) ON CONFLICT(name) DO UPDATE SET cmd=excluded.cmd, "
                   "args=excluded.args, every=excluded.every, timeout=excluded.timeout, targets=excluded.targets, "
                   "created_at=excluded.created_at", (name, cmd, js(args), every, timeout, js(targets), time.time()))

    def schedule(self, name: str) -> dict[str, Any] | None:
        row = self.one("SELECT * FROM schedules WHERE name=%s", (name,))
        return _schedule(row) if row else None

    def schedules(self) -> list[dict[str, Any]]:
        rows = self.all(
            "SELECT s.*, (SELECT COUNT(*) FROM samples m WHERE m.series=s.name) AS samples, "
            "(SELECT MAX(time) FROM samples m WHERE m.series=s.name) AS last_sample FROM schedules s ORDER BY name")
        return [_schedule(r) for r in rows]

    def schedule_specs(self) -> list[dict[str, Any]]:
        return [_schedule(r) for r in self.all("SELECT * FROM schedules")]

    def delete_schedule(self, name: str) -> None:
        self.write("DELETE FROM schedules WHERE name=%s", (name,))

    def forget_samples(self, before: float) -> int:
        return self.write("DELETE FROM samples WHERE time<%s", (before,))

    def series(self, name: str, since: float | None, until: float | None, limit: int) -> list[dict[str, Any]]:
        rows = self.all(
            "SELECT m.uuid, a.hostname, m.time, m.status, m.fields, m.error FROM samples m "
            "LEFT JOIN agents a ON a.uuid=m.uuid WHERE m.series=%s AND m.time>=%s AND m.time<=%s "
            "ORDER BY m.time, m.uuid LIMIT %s", (name, since or 0.0, until or 1e13, limit))
        return [{**r, "fields": loads(r["fields"])} for r in rows]

    def schedules_given(self, uuid: str) -> set[str]:
        """Names of every schedule the master ever sent ``uuid`` (its ``zy.schedule.set`` tasks).
        The arguments are read here rather than cast to jsonb in SQL: jsonb refuses some JSON
        text (a \\u0000) that a text column holds."""
        rows = self.all("SELECT DISTINCT r.args FROM tasks t JOIN runs r ON r.id = t.run_id "
                        "WHERE t.uuid=%s AND r.cmd='zy.schedule.set'", (uuid,))
        args = [loads(r["args"]) for r in rows]
        return {a["name"] for a in args if isinstance(a, dict) and isinstance(a.get("name"), str)}


def _schedule(row: dict[str, Any]) -> dict[str, Any]:
    row["args"], row["targets"] = loads(row["args"]), loads(row["targets"])
    return row
