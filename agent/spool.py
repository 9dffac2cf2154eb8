"""The agent's durable memory: results not yet acknowledged, and every taskid ever accepted.

A message is written here before it is sent, and deleted only when the master acknowledges
it; after a reconnect everything still here is sent again. The ``tasks`` table is how an agent
never runs one taskid twice, even across restarts.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from hcsdk.protocol.wire import encode_frame

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, taskid TEXT NOT NULL,
    seq INTEGER NOT NULL, frame BLOB NOT NULL, UNIQUE(taskid, seq));
CREATE TABLE IF NOT EXISTS tasks (taskid TEXT PRIMARY KEY, state TEXT NOT NULL, cmd TEXT NOT NULL,
    received_at REAL NOT NULL, pgid INTEGER);
CREATE TABLE IF NOT EXISTS cancels (taskid TEXT PRIMARY KEY);
"""


class Spool:
    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(tasks)")}
        if "pgid" not in columns:  # spools written before pgid was kept
            self.db.execute("ALTER TABLE tasks ADD COLUMN pgid INTEGER")

    def close(self) -> None:
        self.db.close()

    def append(self, msgs: list[dict[str, Any]]) -> None:
        rows = [(m["taskid"], m["seq"], encode_frame(m)) for m in msgs]
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO outbox(taskid, seq, frame) VALUES(?,?,?)", rows)
        self.db.execute("COMMIT")

    def pending_after(self, last_id: int, limit: int = 500,
                      max_bytes: int = 4 * 1024 * 1024) -> list[tuple[int, bytes]]:
        """Frames after ``last_id`` in order, at most ``limit`` of them and (beyond the first)
        at most ``max_bytes`` together, so a batch always fits one request."""
        out: list[tuple[int, bytes]] = []
        size = 0
        for row in self.db.execute("SELECT id, frame FROM outbox WHERE id>? ORDER BY id LIMIT ?", (last_id, limit)):
            frame = bytes(row[1])
            if out and size + len(frame) > max_bytes:
                break
            out.append((int(row[0]), frame))
            size += len(frame)
        return out

    def ack(self, pairs: list[list[Any]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM outbox WHERE taskid=? AND seq=?",
                            [(p[0], p[1]) for p in pairs if isinstance(p, list) and len(p) == 2])
        self.db.execute("COMMIT")

    def unacked(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def pending_for(self, taskids: set[str]) -> int:
        """Unacknowledged messages of these tasks."""
        if not taskids:
            return 0
        ids = list(taskids)
        q = f"SELECT COUNT(*) FROM outbox WHERE taskid IN ({','.join('?' * len(ids))})"
        return int(self.db.execute(q, ids).fetchone()[0])

    def claim(self, taskid: str, cmd: str) -> bool:
        """Record a task as accepted; False when this taskid was seen before."""
        cur = self.db.execute("INSERT OR IGNORE INTO tasks(taskid, state, cmd, received_at) VALUES(?,?,?,?)",
                              (taskid, "running", cmd, time.time()))
        return cur.rowcount == 1

    def finish(self, taskid: str, final: list[dict[str, Any]]) -> None:
        """Spool a task's last messages and mark it done in one commit, so a crash cannot
        leave a finished task looking interrupted."""
        rows = [(m["taskid"], m["seq"], encode_frame(m)) for m in final]  # may raise: before BEGIN
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO outbox(taskid, seq, frame) VALUES(?,?,?)", rows)
        self.db.execute("UPDATE tasks SET state='done' WHERE taskid=?", (taskid,))
        self.db.execute("COMMIT")

    def pass_cancel(self, taskid: str) -> None:
        """A cancel for a task another process of this agent runs (the old build, handing over):
        it picks it up from here (``take_cancels``)."""
        self.db.execute("INSERT OR IGNORE INTO cancels(taskid) SELECT taskid FROM tasks WHERE taskid=? "
                        "AND state='running'", (taskid,))

    def take_cancels(self) -> list[str]:
        self.db.execute("BEGIN IMMEDIATE")
        taskids = [r[0] for r in self.db.execute("SELECT taskid FROM cancels")]
        self.db.execute("DELETE FROM cancels")
        self.db.execute("COMMIT")
        return taskids

    def set_pgid(self, taskid: str, pgid: int) -> None:
        self.db.execute("UPDATE tasks SET pgid=? WHERE taskid=?", (pgid, taskid))

    def interrupted(self) -> list[tuple[str, str, int | None, float]]:
        """Tasks that were running when the agent last stopped: (taskid, cmd, pgid, received_at)."""
        rows = self.db.execute("SELECT taskid, cmd, pgid, received_at FROM tasks WHERE state='running'")
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def forget_before(self, cutoff: float) -> None:
        self.db.execute("DELETE FROM tasks WHERE state='done' AND received_at<?", (cutoff,))
