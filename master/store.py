"""The master's durable state in SQLite (WAL).

All methods are synchronous and are called from one worker thread at a time (see
``master.state.Db``), so the event loop never blocks on disk. The schema is small on purpose;
a PostgreSQL store would implement the same methods.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hcsdk.protocol.wire import dumps, loads

FINAL = ("ok", "failed", "timeout", "offline", "cancelled", "error")
_FINAL_SQL = "('ok','failed','timeout','offline','cancelled','error')"
_START_SQL = "UPDATE tasks SET status='running', started_at=? WHERE taskid=? AND status IN ('pending','dispatched')"
# An agent's own verdict overrides one the master presumed (e.g. "went offline").
_DONE_SQL = ("UPDATE tasks SET status=?, exit_code=?, started_at=COALESCE(started_at, ?), finished_at=?, error=?, "
             f"truncated=?, final_source='agent' WHERE taskid=? AND (status NOT IN {_FINAL_SQL} "
             "OR final_source='master')")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS join_tokens (
    id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, description TEXT NOT NULL DEFAULT '',
    uses INTEGER NOT NULL DEFAULT 0, kind TEXT NOT NULL DEFAULT 'agent', proxy_names TEXT NOT NULL DEFAULT '[]',
    max_uses INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS agents (
    uuid TEXT PRIMARY KEY, credential_hash TEXT NOT NULL, token_id TEXT NOT NULL,
    hostname TEXT NOT NULL DEFAULT '', facts TEXT NOT NULL DEFAULT '{}', labels TEXT NOT NULL DEFAULT '{}',
    enrolled_at REAL NOT NULL, last_seen REAL, revoked INTEGER NOT NULL DEFAULT 0,
    connects INTEGER NOT NULL DEFAULT 0, e2e_key TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT 'agent');
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, cmd TEXT NOT NULL, args TEXT NOT NULL, timeout REAL NOT NULL,
    created_at REAL NOT NULL, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    taskid TEXT PRIMARY KEY, run_id TEXT NOT NULL, uuid TEXT NOT NULL, status TEXT NOT NULL,
    exit_code INTEGER, started_at REAL, finished_at REAL, error TEXT, final_source TEXT,
    deadline REAL NOT NULL, cancel_requested INTEGER NOT NULL DEFAULT 0, truncated TEXT);
CREATE INDEX IF NOT EXISTS tasks_run ON tasks(run_id);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks(uuid, status);
CREATE INDEX IF NOT EXISTS tasks_open_deadline ON tasks(deadline)
    WHERE status NOT IN ('ok','failed','timeout','offline','cancelled','error');
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, taskid TEXT NOT NULL,
    uuid TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    UNIQUE(taskid, seq));
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, id);
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY, cmd TEXT NOT NULL, args TEXT NOT NULL, every REAL NOT NULL, timeout REAL NOT NULL,
    targets TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT, series TEXT NOT NULL, uuid TEXT NOT NULL, taskid TEXT NOT NULL,
    seq INTEGER NOT NULL, time REAL NOT NULL, status TEXT NOT NULL, fields TEXT NOT NULL, error TEXT,
    UNIQUE(uuid, taskid, seq));
CREATE INDEX IF NOT EXISTS samples_series ON samples(series, time);
"""


#: columns join_tokens gained after its first release: added to older databases at open. A token
#: from before they existed is an agent token (kind 'agent'): it can no longer enroll a proxy.
_TOKEN_COLUMNS = {
    "kind": "TEXT NOT NULL DEFAULT 'agent'",
    "proxy_names": "TEXT NOT NULL DEFAULT '[]'",
    "max_uses": "INTEGER NOT NULL DEFAULT 0",
}


class TokenUsedUp(Exception):
    """A join token limited to N enrollments has had them all."""


class Store:
    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (what "kill the master" tests); only a
        # power cut can lose the last commits.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self._migrate_join_tokens()

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> sqlite3.Connection:
        return self.db

    # -- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(k, v) VALUES(?, ?)", (key, value))

    # -- join tokens ------------------------------------------------------------------------
    def _migrate_join_tokens(self) -> None:
        have = {r[1] for r in self.db.execute("PRAGMA table_info(join_tokens)")}
        for column, decl in _TOKEN_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE join_tokens ADD COLUMN {column} {decl}")
        # enrollment warns about a hostname already taken: keep that lookup off a full scan
        self.db.execute("CREATE INDEX IF NOT EXISTS agents_hostname ON agents(hostname)")

    def add_join_token(self, token_id: str, secret_hash: str, ttl: float, description: str, kind: str = "agent",
                       proxy_names: Iterable[str] = (), max_uses: int = 0) -> dict[str, Any]:
        """``max_uses`` 0: any number of enrollments until it expires."""
        now = time.time()
        self.db.execute(
            "INSERT INTO join_tokens(id, secret_hash, created_at, expires_at, description, kind, proxy_names, "
            "max_uses) VALUES(?,?,?,?,?,?,?,?)",
            (token_id, secret_hash, now, now + ttl, description, kind, dumps(list(proxy_names)).decode(), max_uses),
        )
        return self.join_token(token_id) or {}

    def join_token(self, token_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM join_tokens WHERE id=?", (token_id,)).fetchone()
        return _token(row) if row else None

    def join_tokens(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, created_at, expires_at, revoked, description, uses, kind, proxy_names, max_uses "
            "FROM join_tokens ORDER BY created_at"
        )
        return [_token(r) for r in rows]

    def revoke_join_token(self, token_id: str) -> bool:
        return self.db.execute("UPDATE join_tokens SET revoked=1 WHERE id=?", (token_id,)).rowcount > 0

    def _claim_token(self, token_id: str, uuid: str) -> None:
        """Count one use of the token, in the enrollment's transaction: of two enrollments racing
        for a token's last use exactly one gets it. Enrolling the same uuid again (an agent that
        crashed before saving its credential) is not another use."""
        again = self.db.execute("SELECT 1 FROM agents WHERE uuid=? AND token_id=?", (uuid, token_id)).fetchone()
        if again:
            return
        claimed = self.db.execute("UPDATE join_tokens SET uses=uses+1 WHERE id=? AND (max_uses=0 OR uses<max_uses)",
                                  (token_id,)).rowcount
        if not claimed:
            raise TokenUsedUp(token_id)

    # -- agents -----------------------------------------------------------------------------
    def enroll(self, uuid: str, credential_hash: str, token_id: str, facts: dict[str, Any],
               labels: dict[str, str], e2e_key: bytes, kind: str = "agent") -> list[str]:
        """Returns the other enrolled (not revoked) clients of this kind reporting the same
        hostname, for a warning. Raises TokenUsedUp when the token has no use left."""
        hostname = str(facts.get("hostname", ""))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._claim_token(token_id, uuid)
            self.db.execute(
                "INSERT INTO agents(uuid, credential_hash, token_id, hostname, facts, labels, enrolled_at, e2e_key, "
                "kind) VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(uuid) DO UPDATE SET "
                "credential_hash=excluded.credential_hash, e2e_key=excluded.e2e_key",
                (uuid, credential_hash, token_id, hostname, dumps(facts).decode(),
                 dumps(labels).decode(), time.time(), e2e_key.hex(), kind),
            )
            same = self.db.execute("SELECT uuid FROM agents WHERE hostname=? AND kind=? AND uuid<>? AND revoked=0 "
                                   "LIMIT 5", (hostname, kind, uuid)).fetchall() if hostname else []
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [r[0] for r in same]

    def agent(self, uuid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM agents WHERE uuid=?", (uuid,)).fetchone()
        return dict(row) if row else None

    def agent_connected(self, uuid: str, facts: dict[str, Any], labels: dict[str, str]) -> None:
        self.db.execute(
            "UPDATE agents SET hostname=?, facts=?, labels=?, last_seen=?, connects=connects+1 WHERE uuid=?",
            (str(facts.get("hostname", "")), dumps(facts).decode(), dumps(labels).decode(), time.time(), uuid),
        )

    def touch_agents(self, seen: dict[str, float]) -> None:
        self.db.executemany("UPDATE agents SET last_seen=? WHERE uuid=?", [(t, u) for u, t in seen.items()])

    def revoke_agent(self, uuid: str) -> bool:
        return self.db.execute("UPDATE agents SET revoked=1 WHERE uuid=?", (uuid,)).rowcount > 0

    def agents(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT * FROM agents" + ("" if include_revoked else " WHERE revoked=0") + " ORDER BY hostname, uuid"
        out = []
        for row in self.db.execute(sql):
            rec = dict(row)
            rec["facts"] = loads(rec["facts"])
            rec["labels"] = loads(rec["labels"])
            out.append(rec)
        return out

    def target_rows(self) -> list[dict[str, Any]]:
        """What targeting needs of every live agent (not proxies), without the facts: at
        10,000 agents, decoding every agent's facts for each run cost more than the run."""
        sql = ("SELECT uuid, hostname, labels FROM agents WHERE revoked=0 AND COALESCE(kind, 'agent')='agent' "
               "ORDER BY hostname, uuid")
        return [{"uuid": r[0], "hostname": r[1], "labels": loads(r[2])} for r in self.db.execute(sql)]

    # -- runs and tasks ---------------------------------------------------------------------
    def create_run(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float,
                   tasks: list[tuple[str, str, str, float]]) -> list[dict[str, Any]]:
        """Insert a run and its tasks ``(taskid, uuid, status, deadline)``.

        Tasks created already final (offline targets) get their ``done`` event here, so the
        SDK sees them like any other result. Returns those events.
        """
        now = time.time()
        events = []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT INTO runs(id, cmd, args, timeout, created_at, total) VALUES(?,?,?,?,?,?)",
                (run_id, cmd, dumps(args).decode(), timeout, now, len(tasks)),
            )
            self.db.executemany(
                "INSERT INTO tasks(taskid, run_id, uuid, status, deadline, finished_at, final_source) "
                "VALUES(?,?,?,?,?,?,?)",
                [(tid, run_id, uuid, st, dl, now if st in FINAL else None, "master" if st in FINAL else None)
                 for tid, uuid, st, dl in tasks],
            )
            for tid, uuid, st, _ in tasks:
                if st in FINAL:
                    events.append(self._insert_event(run_id, tid, uuid, 0, "done",
                                                     {"status": st, "error": "agent is offline"}))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [e for e in events if e]

    def _insert_event(self, run_id: str, taskid: str, uuid: str, seq: int, kind: str,
                      data: dict[str, Any]) -> dict[str, Any] | None:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO events(run_id, taskid, uuid, seq, kind, data) VALUES(?,?,?,?,?,?)",
            (run_id, taskid, uuid, seq, kind, dumps(data).decode()),
        )
        if cur.rowcount == 0:
            return None
        return {"id": cur.lastrowid, "run_id": run_id, "taskid": taskid, "uuid": uuid, "seq": seq, "kind": kind}

    def task(self, taskid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT t.taskid, t.uuid, t.status, r.cmd FROM tasks t JOIN runs r ON r.id = t.run_id "
                              "WHERE t.taskid=?", (taskid,)).fetchone()
        return dict(row) if row else None

    # -- schedules and their samples -------------------------------------------------------
    def put_schedule(self, name: str, cmd: str, args: dict[str, Any], every: float, timeout: float,
                     targets: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO schedules(name, cmd, args, every, timeout, targets, created_at) "
                        "VALUES(?,?,?,?,?,?,?)", (name, cmd, dumps(args).decode(), every, timeout,
                                                  dumps(targets).decode(), time.time()))

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

    def target_row(self, uuid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT uuid, hostname, labels FROM agents WHERE uuid=?", (uuid,)).fetchone()
        return {"uuid": row[0], "hostname": row[1], "labels": loads(row[2])} if row else None

    def forget_samples(self, before: float) -> int:
        return self.db.execute("DELETE FROM samples WHERE time<?", (before,)).rowcount

    def delete_schedule(self, name: str) -> None:
        self.db.execute("DELETE FROM schedules WHERE name=?", (name,))

    def series(self, name: str, since: float | None, until: float | None, limit: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT m.uuid, a.hostname, m.time, m.status, m.fields, m.error FROM samples m "
            "LEFT JOIN agents a ON a.uuid=m.uuid WHERE m.series=? AND m.time>=? AND m.time<=? "
            "ORDER BY m.time, m.uuid LIMIT ?", (name, since or 0.0, until or 1e13, limit))
        return [{**dict(r), "fields": loads(r["fields"])} for r in rows]

    def task_runs(self, taskids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """taskid -> (run_id, uuid) for the given task ids."""
        ids = list(set(taskids))
        out: dict[str, tuple[str, str]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = f"SELECT taskid, run_id, uuid FROM tasks WHERE taskid IN ({','.join('?' * len(part))})"
            out.update({r[0]: (r[1], r[2]) for r in self.db.execute(q, part)})
        return out

    def ingest(self, batch: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, list[list[Any]]], set[str]]:
        """Persist messages from agents in one transaction, with one statement per kind of row
        (executemany): per-message statements were the ceiling of the fan-out at 1,000 agents.

        Returns the acknowledgements to send back per agent and the runs that changed.
        Messages about unknown tasks, or from an agent that is not the task's target, are
        acknowledged (so the agent stops resending) but not stored; resends already held are
        acknowledged and skipped.
        """
        owners = self.task_runs(m["taskid"] for _, m in batch if isinstance(m.get("taskid"), str))
        held = self._held_events(owners)
        acks: dict[str, list[list[Any]]] = {}
        changed: set[str] = set()
        events, starts, dones, samples = [], [], [], []
        for uuid, msg in batch:
            taskid, seq = msg.get("taskid"), msg.get("seq")
            acks.setdefault(uuid, []).append([taskid, seq])
            if not isinstance(taskid, str) or not isinstance(seq, int):
                continue
            if msg["t"] == "sample":
                p = msg["p"]
                samples.append((p["series"], uuid, taskid, seq, p["time"], p["status"], dumps(p["fields"]).decode(),
                                p.get("error")))
                continue
            owner = owners.get(taskid)
            if owner is None or owner[1] != uuid or (taskid, seq) in held:
                continue
            held.add((taskid, seq))
            changed.add(owner[0])
            kind, p = msg["t"], msg.get("p") or {}
            events.append((owner[0], taskid, uuid, seq, kind, dumps(p).decode()))
            if kind == "start":
                starts.append((p.get("started_at"), taskid))
            elif kind == "done":
                dones.append((p.get("status", "error"), p.get("exit_code"), p.get("started_at"), p.get("finished_at"),
                              p.get("error"), dumps(p.get("truncated") or {}).decode(), taskid))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "INSERT OR IGNORE INTO events(run_id, taskid, uuid, seq, kind, data) VALUES(?,?,?,?,?,?)", events)
            self.db.executemany(_START_SQL, starts)
            self.db.executemany(_DONE_SQL, dones)
            self.db.executemany("INSERT OR IGNORE INTO samples(series, uuid, taskid, seq, time, status, fields, error) "
                                "VALUES(?,?,?,?,?,?,?,?)", samples)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return acks, changed

    def _held_events(self, owners: dict[str, tuple[str, str]]) -> set[tuple[str, int]]:
        """(taskid, seq) already stored for these tasks: resends to skip."""
        ids = list(owners)
        held: set[tuple[str, int]] = set()
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = f"SELECT taskid, seq FROM events WHERE taskid IN ({','.join('?' * len(part))})"
            held.update((r[0], r[1]) for r in self.db.execute(q, part))
        return held

    def open_tasks_for(self, uuid: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT t.taskid, t.run_id, t.status, t.cancel_requested, t.deadline, r.cmd, r.args, r.timeout "
            f"FROM tasks t JOIN runs r ON r.id=t.run_id WHERE t.uuid=? AND t.status NOT IN {_FINAL_SQL}",
            (uuid,),
        )
        return [dict(r) for r in rows]

    def mark_dispatched(self, taskids: list[str]) -> None:
        self.db.executemany(
            "UPDATE tasks SET status='dispatched' WHERE taskid=? AND status='pending'", [(t,) for t in taskids]
        )

    def finish_by_master(self, items: list[tuple[str, str, str]]) -> set[str]:
        """Final status decided by the master ``(taskid, status, error)``; returns changed runs."""
        owners = self.task_runs(t for t, _, _ in items)
        changed = set()
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for taskid, status, error in items:
                cur = self.db.execute(
                    f"UPDATE tasks SET status=?, error=?, finished_at=?, final_source='master' "
                    f"WHERE taskid=? AND status NOT IN {_FINAL_SQL}",
                    (status, error, now, taskid),
                )
                if cur.rowcount and taskid in owners:
                    run_id, uuid = owners[taskid]
                    # seq -1 marks a verdict of the master's; agents' seqs start at 0
                    self._insert_event(run_id, taskid, uuid, -1, "done", {"status": status, "error": error})
                    changed.add(run_id)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return changed

    def request_cancel(self, run_id: str) -> list[dict[str, Any]]:
        self.db.execute(f"UPDATE tasks SET cancel_requested=1 WHERE run_id=? AND status NOT IN {_FINAL_SQL}",
                        (run_id,))
        rows = self.db.execute(
            f"SELECT taskid, uuid, status FROM tasks WHERE run_id=? AND status NOT IN {_FINAL_SQL}", (run_id,)
        )
        return [dict(r) for r in rows]

    def overdue_tasks(self, now: float) -> list[dict[str, Any]]:
        rows = self.db.execute(
            f"SELECT taskid, uuid, status FROM tasks WHERE deadline < ? AND status NOT IN {_FINAL_SQL}", (now,)
        )
        return [dict(r) for r in rows]

    def open_task_agents(self) -> list[str]:
        rows = self.db.execute(f"SELECT DISTINCT uuid FROM tasks WHERE status NOT IN {_FINAL_SQL}")
        return [r[0] for r in rows]

    def run(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if not row:
            return None
        rec = dict(row)
        rec["args"] = loads(rec["args"])
        rec["tasks"] = [dict(r) for r in self.db.execute(
            "SELECT t.*, a.hostname FROM tasks t LEFT JOIN agents a ON a.uuid=t.uuid WHERE run_id=? ORDER BY taskid",
            (run_id,))]
        rec["open"] = sum(1 for t in rec["tasks"] if t["status"] not in FINAL)
        return rec

    def run_exists(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone() is not None

    def run_open_count(self, run_id: str) -> int:
        row = self.db.execute(f"SELECT COUNT(*) FROM tasks WHERE run_id=? AND status NOT IN {_FINAL_SQL}", (run_id,))
        return int(row.fetchone()[0])

    def events_after(self, run_id: str, cursor: int, limit: int = 2000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, taskid, uuid, seq, kind, data FROM events WHERE run_id=? AND id>? ORDER BY id LIMIT ?",
            (run_id, cursor, limit),
        )
        return [dict(r) for r in rows]


def _token(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["proxy_names"] = loads(out.get("proxy_names") or "[]")
    return out


def _schedule(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["args"], out["targets"] = loads(out["args"]), loads(out["targets"])
    return out


# -- what the master gave each agent (issue 13): schedules it may report, and sample into ----
def schedules_given(store: Store, uuid: str) -> set[str]:
    """Names of every schedule the master ever sent ``uuid`` (its ``zy.schedule.set`` tasks):
    the only names a handshake may get cancelled, and the only series it may write samples to.
    The tasks table already is that record, so nothing new needs storing."""
    rows = store.db.execute(
        "SELECT DISTINCT json_extract(r.args, '$.name') FROM tasks t JOIN runs r ON r.id = t.run_id "
        "WHERE t.uuid=? AND r.cmd='zy.schedule.set'", (uuid,))
    return {r[0] for r in rows if isinstance(r[0], str)}
