"""SQLite: the cluster's state (masters, sessions, leases), as on PostgreSQL.

One master holds everything on SQLite, but it keeps the same records through the same methods,
so the master runs one code path on either store. Statuses come from the protocol's vocabulary.
"""

from __future__ import annotations

import time
from typing import Any

from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.wire import loads

from .protocol import MasterRecord
from .sqlite_base import SQLiteBase, in_chunks, js, sql_list

#: the lease whose holder runs the cluster's singleton work (masters() flags it)
SINGLETON = "singleton"

# (the status is written into the statement, not bound: the partial index tasks_pending only
# serves a query whose WHERE names the same literal)
_PENDING_SQL = (
    "SELECT t.taskid, t.run_id, t.uuid, t.status, t.cancel_requested, t.deadline, r.cmd, r.args, r.timeout "
    "FROM tasks t JOIN sessions s ON s.uuid = t.uuid JOIN runs r ON r.id = t.run_id "
    f"WHERE t.status = '{TaskStatus.PENDING}' AND s.master_id = ? ORDER BY t.run_id, t.taskid"
)
_CANCELS_SQL = (
    "SELECT t.taskid, t.run_id, t.uuid, t.status FROM sessions s JOIN tasks t ON t.uuid = s.uuid "
    f"WHERE s.master_id = ? AND t.cancel_requested = 1 "
    f"AND t.status IN {sql_list((TaskStatus.DISPATCHED, TaskStatus.RUNNING))}"
)
_TAKE_LEASE_SQL = (
    "INSERT INTO leases(name, holder, expires_at) VALUES(?, ?, ?) "
    "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
    "WHERE leases.holder = excluded.holder OR leases.expires_at <= ?"
)
# as postgres_cluster.py's: a master id taken unless another process of it still heartbeats
_JOIN_SQL = (
    "INSERT INTO masters(id, urls, started_at, heartbeat_at, agents, instance) VALUES(?, ?, ?, ?, 0, ?) "
    "ON CONFLICT(id) DO UPDATE SET urls = excluded.urls, started_at = excluded.started_at, "
    "heartbeat_at = excluded.heartbeat_at, agents = 0, instance = excluded.instance "
    "WHERE masters.instance = excluded.instance OR masters.heartbeat_at < ? OR masters.heartbeat_at = ? "
    "RETURNING id"
)
_TAKE_LEASE_HELD_SQL = (
    "INSERT INTO leases(name, holder, expires_at) SELECT ?, ?, ? "
    "WHERE EXISTS (SELECT 1 FROM masters WHERE id = ? AND instance = ?) "
    "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
    "WHERE leases.holder = excluded.holder OR leases.expires_at <= ?"
)
_CLAIM_SQL = (
    "INSERT INTO sessions(uuid, master_id, epoch, since) VALUES(?, ?, 1, ?) "
    "ON CONFLICT(uuid) DO UPDATE SET master_id = excluded.master_id, epoch = sessions.epoch + 1, "
    "since = excluded.since RETURNING epoch"
)


class ClusterSQL(SQLiteBase):
    # -- masters ----------------------------------------------------------------------------
    def register_master(self, master_id: str, urls: list[str], now: float, instance: str = "") -> None:
        self.db.execute(
            "INSERT INTO masters(id, urls, started_at, heartbeat_at, agents, instance) VALUES(?, ?, ?, ?, 0, ?) "
            "ON CONFLICT(id) DO UPDATE SET urls = excluded.urls, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, agents = 0, instance = excluded.instance",
            (master_id, js(list(urls)), now, now, instance),
        )

    def join_master(self, master_id: str, instance: str, urls: list[str], now: float, dead_after: float,
                    stale_beat: float | None = None) -> bool:
        row = self.db.execute(_JOIN_SQL, (master_id, js(list(urls)), now, now, instance, now - dead_after,
                                          stale_beat)).fetchone()
        return row is not None

    def master_instance(self, master_id: str) -> tuple[str, float, float] | None:
        row = self.db.execute("SELECT instance, heartbeat_at FROM masters WHERE id = ?", (master_id,)).fetchone()
        return None if row is None else (str(row[0]), float(row[1]), time.time() - float(row[1]))

    def master_heartbeat(self, master_id: str, agents: int, now: float, instance: str | None = None) -> bool:
        if instance is None:
            cur = self.db.execute("UPDATE masters SET heartbeat_at = ?, agents = ? WHERE id = ?",
                                  (now, agents, master_id))
        else:
            cur = self.db.execute("UPDATE masters SET heartbeat_at = ?, agents = ? WHERE id = ? AND instance = ?",
                                  (now, agents, master_id, instance))
        return cur.rowcount > 0

    def masters(self) -> list[MasterRecord]:
        rows = self.db.execute(
            "SELECT m.id, m.urls, m.started_at, m.heartbeat_at, m.agents, l.holder IS NOT NULL AS singleton "
            "FROM masters m LEFT JOIN leases l ON l.name = ? AND l.holder = m.id AND l.expires_at > ? "
            "ORDER BY m.started_at, m.id",
            (SINGLETON, now := time.time()),
        )
        return [MasterRecord(id=r[0], urls=list(loads(r[1])), started_at=r[2], heartbeat_at=r[3],
                             heartbeat_age=now - r[3], agents=r[4], singleton=bool(r[5])) for r in rows]

    def forget_master(self, master_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM masters WHERE id = ?", (master_id,))
            db.execute("DELETE FROM leases WHERE holder = ?", (master_id,))

    def dead_masters(self, now: float, dead_after: float) -> list[str]:
        rows = self.db.execute("SELECT id FROM masters WHERE heartbeat_at < ? ORDER BY id", (now - dead_after,))
        return [r[0] for r in rows]

    # -- leases -----------------------------------------------------------------------------
    def take_lease(self, name: str, holder: str, ttl: float, now: float, instance: str | None = None) -> bool:
        # one statement: insert, or take over an expired or own lease; the WHERE refuses another's
        if instance is None:
            cur = self.db.execute(_TAKE_LEASE_SQL, (name, holder, now + ttl, now))
        else:  # (no row to insert unless this process holds the holder's registry row)
            cur = self.db.execute(_TAKE_LEASE_HELD_SQL, (name, holder, now + ttl, holder, instance, now))
        return cur.rowcount > 0

    def release_lease(self, name: str, holder: str) -> None:
        self.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def lease_holder(self, name: str, now: float) -> str | None:
        row = self.db.execute("SELECT holder FROM leases WHERE name = ? AND expires_at > ?", (name, now)).fetchone()
        return str(row[0]) if row else None

    # -- sessions ---------------------------------------------------------------------------
    def claim_session(self, uuid: str, master_id: str, now: float) -> int:
        return int(self.db.execute(_CLAIM_SQL, (uuid, master_id, now)).fetchone()[0])

    def reclaim_session(self, uuid: str, master_id: str, epoch: int) -> int | None:
        row = self.db.execute(
            "UPDATE sessions SET master_id = ?, epoch = epoch + 1, since = ? "
            "WHERE uuid = ? AND epoch = ? AND (master_id IS NULL OR master_id = ?) RETURNING epoch",
            (master_id, time.time(), uuid, epoch, master_id)).fetchone()
        return None if row is None else int(row[0])

    def drop_session(self, uuid: str, master_id: str, epoch: int) -> bool:
        cur = self.db.execute("UPDATE sessions SET master_id = NULL WHERE uuid = ? AND master_id = ? AND epoch = ?",
                              (uuid, master_id, epoch))
        return cur.rowcount > 0

    def session_holders(self, uuids: list[str] | None = None) -> dict[str, tuple[str, int]]:
        if uuids is None:
            rows = self.db.execute("SELECT uuid, master_id, epoch FROM sessions WHERE master_id IS NOT NULL")
            return {r[0]: (r[1], int(r[2])) for r in rows}
        out: dict[str, tuple[str, int]] = {}
        for part, marks in in_chunks(list(set(uuids))):
            rows = self.db.execute(
                f"SELECT uuid, master_id, epoch FROM sessions WHERE master_id IS NOT NULL AND uuid IN {marks}", part)
            out.update({r[0]: (r[1], int(r[2])) for r in rows})
        return out

    def drop_sessions_of(self, master_id: str) -> list[str]:
        rows = self.db.execute("UPDATE sessions SET master_id = NULL WHERE master_id = ? RETURNING uuid", (master_id,))
        return sorted(r[0] for r in rows.fetchall())

    # -- tasks for the sessions a master holds ----------------------------------------------
    def pending_tasks_held_by(self, master_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(_PENDING_SQL, (master_id,))]

    def cancels_held_by(self, master_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(_CANCELS_SQL, (master_id,))]
