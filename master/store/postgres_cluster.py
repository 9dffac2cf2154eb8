"""PostgreSQL: the cluster's state (masters, sessions, leases), as sqlite_cluster.py.

Several masters call these at once. Each write is one statement (INSERT ... ON CONFLICT, UPDATE
... RETURNING), so it is atomic under PostgreSQL's row locks without a transaction around it:
of two masters taking one lease, one gets it; two claims of one session get two epochs.

Times are the database's clock, not the masters': each master's ``time.time()`` may be off by
seconds, and a lease, a heartbeat or a death judged against two clocks is judged wrong (a master
whose clock runs ahead takes a lease still held; one behind is taken for dead). A ``now`` given
counts only as an offset from its caller's clock: the time stored or compared is
``database clock + (now - time.time())``. A master passes ``time.time()``, so its own skew
cancels out; a caller meaning "60 s ago" (a test) still gets 60 s before the database's now.
"""

from __future__ import annotations

import time
from typing import Any

from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.wire import loads

from .postgres_base import PostgresBase, js, sql_list
from .protocol import MasterRecord

#: the lease whose holder runs the cluster's singleton work (masters() flags it)
SINGLETON = "singleton"

# (the status is written into the statement, not bound: the partial index tasks_pending only
# serves a plan whose WHERE names the same literal, and a prepared generic plan knows no value)
_PENDING_SQL = (
    "SELECT t.taskid, t.run_id, t.uuid, t.status, t.cancel_requested::int AS cancel_requested, t.deadline, r.cmd, "
    "r.args, r.timeout "
    "FROM tasks t JOIN sessions s ON s.uuid = t.uuid JOIN runs r ON r.id = t.run_id "
    f"WHERE t.status = '{TaskStatus.PENDING}' AND s.master_id = %s ORDER BY t.run_id, t.taskid"
)
_CANCELS_SQL = (
    "SELECT t.taskid, t.run_id, t.uuid, t.status FROM sessions s JOIN tasks t ON t.uuid = s.uuid "
    "WHERE s.master_id = %s AND t.cancel_requested "
    f"AND t.status IN {sql_list((TaskStatus.DISPATCHED, TaskStatus.RUNNING))}"
)
#: the database's clock in seconds since the epoch, plus the offset bound to it (see the docstring)
NOW = "(extract(epoch FROM clock_timestamp())::float8 + %s)"
_TAKE_LEASE_SQL = (
    f"INSERT INTO leases(name, holder, expires_at) VALUES(%s, %s, {NOW} + %s) "
    "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
    f"WHERE leases.holder = excluded.holder OR leases.expires_at <= {NOW} RETURNING holder"
)
_CLAIM_SQL = (
    f"INSERT INTO sessions(uuid, master_id, epoch, since) VALUES(%s, %s, 1, {NOW}) "
    "ON CONFLICT(uuid) DO UPDATE SET master_id = excluded.master_id, epoch = sessions.epoch + 1, "
    "since = excluded.since RETURNING epoch"
)
# a master id taken by this process: unless another process of that id (another instance) still
# heartbeats; a silent one (dead_after) or one whose heartbeat the caller saw and has not moved
# since (stale_beat) is taken over
_JOIN_SQL = (
    f"INSERT INTO masters(id, urls, started_at, heartbeat_at, agents, instance) VALUES(%s, %s, {NOW}, {NOW}, 0, %s) "
    "ON CONFLICT(id) DO UPDATE SET urls = excluded.urls, started_at = excluded.started_at, "
    "heartbeat_at = excluded.heartbeat_at, agents = 0, instance = excluded.instance "
    f"WHERE masters.instance = excluded.instance OR masters.heartbeat_at < {NOW} - %s "
    "OR masters.heartbeat_at = %s RETURNING id"
)
# a lease taken or renewed only by the process that holds the holder's registry row
_TAKE_LEASE_HELD_SQL = (
    f"INSERT INTO leases(name, holder, expires_at) SELECT %s, %s, {NOW} + %s "
    "WHERE EXISTS (SELECT 1 FROM masters WHERE id = %s AND instance = %s) "
    "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
    f"WHERE leases.holder = excluded.holder OR leases.expires_at <= {NOW} RETURNING holder"
)
# a claim only of a session still as this master left it: its epoch, and held by it or nobody
_RECLAIM_SQL = (
    f"UPDATE sessions SET master_id = %s, epoch = epoch + 1, since = {NOW} "
    "WHERE uuid = %s AND epoch = %s AND (master_id IS NULL OR master_id = %s) RETURNING epoch"
)


def offset(now: float) -> float:
    """``now`` as an offset from this process's clock (what ``NOW`` adds to the database's)."""
    return now - time.time()


class PostgresClusterSQL(PostgresBase):
    # -- masters ----------------------------------------------------------------------------
    def register_master(self, master_id: str, urls: list[str], now: float, instance: str = "") -> None:
        self.write(
            f"INSERT INTO masters(id, urls, started_at, heartbeat_at, agents, instance) "
            f"VALUES(%s, %s, {NOW}, {NOW}, 0, %s) "
            "ON CONFLICT(id) DO UPDATE SET urls = excluded.urls, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, agents = 0, instance = excluded.instance",
            (master_id, js(list(urls)), offset(now), offset(now), instance),
        )

    def join_master(self, master_id: str, instance: str, urls: list[str], now: float, dead_after: float,
                    stale_beat: float | None = None) -> bool:
        row = self.one(_JOIN_SQL, (master_id, js(list(urls)), offset(now), offset(now), instance, offset(now),
                                   dead_after, stale_beat))
        return row is not None

    def master_instance(self, master_id: str) -> tuple[str, float, float] | None:
        row = self.one(f"SELECT instance, heartbeat_at, {NOW} - heartbeat_at AS age FROM masters WHERE id = %s",
                       (0.0, master_id))
        return None if row is None else (str(row["instance"]), float(row["heartbeat_at"]), float(row["age"]))

    def master_heartbeat(self, master_id: str, agents: int, now: float, instance: str | None = None) -> bool:
        if instance is None:
            return self.write(f"UPDATE masters SET heartbeat_at = {NOW}, agents = %s WHERE id = %s",
                              (offset(now), agents, master_id)) > 0
        return self.write(f"UPDATE masters SET heartbeat_at = {NOW}, agents = %s WHERE id = %s AND instance = %s",
                          (offset(now), agents, master_id, instance)) > 0

    def masters(self) -> list[MasterRecord]:
        rows = self.all(
            f"SELECT m.id, m.urls, m.started_at, m.heartbeat_at, {NOW} - m.heartbeat_at AS age, m.agents, "
            "l.holder IS NOT NULL AS singleton "
            f"FROM masters m LEFT JOIN leases l ON l.name = %s AND l.holder = m.id AND l.expires_at > {NOW} "
            "ORDER BY m.started_at, m.id",
            (0.0, SINGLETON, 0.0),
        )
        return [MasterRecord(id=r["id"], urls=list(loads(r["urls"])), started_at=r["started_at"],
                             heartbeat_at=r["heartbeat_at"], heartbeat_age=r["age"], agents=r["agents"],
                             singleton=bool(r["singleton"]))
                for r in rows]

    def forget_master(self, master_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM masters WHERE id = %s", (master_id,))
            conn.execute("DELETE FROM leases WHERE holder = %s", (master_id,))

    def dead_masters(self, now: float, dead_after: float) -> list[str]:
        rows = self.all(f"SELECT id FROM masters WHERE heartbeat_at < {NOW} ORDER BY id", (offset(now) - dead_after,))
        return [r["id"] for r in rows]

    # -- leases -----------------------------------------------------------------------------
    def take_lease(self, name: str, holder: str, ttl: float, now: float, instance: str | None = None) -> bool:
        # one statement: insert, or take over an expired or own lease; the WHERE refuses
        # another's, and then RETURNING gives no row. Two racing inserts: the loser waits on
        # the key, then its DO UPDATE sees the winner's unexpired row and is refused.
        if instance is None:
            row = self.one(_TAKE_LEASE_SQL, (name, holder, offset(now), ttl, offset(now)))
        else:  # (no row to insert unless this process holds the holder's registry row)
            row = self.one(_TAKE_LEASE_HELD_SQL, (name, holder, offset(now), ttl, holder, instance, offset(now)))
        return row is not None

    def release_lease(self, name: str, holder: str) -> None:
        self.write("DELETE FROM leases WHERE name = %s AND holder = %s", (name, holder))

    def lease_holder(self, name: str, now: float) -> str | None:
        row = self.one(f"SELECT holder FROM leases WHERE name = %s AND expires_at > {NOW}", (name, offset(now)))
        return str(row["holder"]) if row else None

    # -- sessions ---------------------------------------------------------------------------
    def claim_session(self, uuid: str, master_id: str, now: float) -> int:
        row = self.one(_CLAIM_SQL, (uuid, master_id, offset(now)))
        assert row is not None  # RETURNING gives the row inserted or updated
        return int(row["epoch"])

    def reclaim_session(self, uuid: str, master_id: str, epoch: int) -> int | None:
        row = self.one(_RECLAIM_SQL, (master_id, 0.0, uuid, epoch, master_id))
        return None if row is None else int(row["epoch"])

    def drop_session(self, uuid: str, master_id: str, epoch: int) -> bool:
        return self.write("UPDATE sessions SET master_id = NULL WHERE uuid = %s AND master_id = %s AND epoch = %s",
                          (uuid, master_id, epoch)) > 0

    def session_holders(self, uuids: list[str] | None = None) -> dict[str, tuple[str, int]]:
        if uuids is None:
            rows = self.all("SELECT uuid, master_id, epoch FROM sessions WHERE master_id IS NOT NULL")
        else:
            rows = self.all("SELECT uuid, master_id, epoch FROM sessions WHERE master_id IS NOT NULL "
                            "AND uuid = ANY(%s)", (list(set(uuids)),))
        return {r["uuid"]: (r["master_id"], int(r["epoch"])) for r in rows}

    def drop_sessions_of(self, master_id: str) -> list[str]:
        rows = self.all("UPDATE sessions SET master_id = NULL WHERE master_id = %s RETURNING uuid", (master_id,))
        return sorted(r["uuid"] for r in rows)

    # -- tasks for the sessions a master holds ----------------------------------------------
    def pending_tasks_held_by(self, master_id: str) -> list[dict[str, Any]]:
        return self.all(_PENDING_SQL, (master_id,))

    def cancels_held_by(self, master_id: str) -> list[dict[str, Any]]:
        return self.all(_CANCELS_SQL, (master_id,))
