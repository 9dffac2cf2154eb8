"""SQLite: runs, their tasks and the events agents send about them."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

from hcsdk.protocol.messages import Done, Sample, Start
from hcsdk.protocol.tasks import FINAL, TaskStatus, Verdict, can_move, may_settle
from hcsdk.protocol.wire import loads

from .protocol import Result
from .sqlite_base import FINAL_SQL, SQLiteBase, in_chunks, js, sql_list

# The lifecycle's moves as the store makes them, read off hcsdk.protocol.tasks (the one table):
#: statuses an agent's ``start`` moves to running
STARTABLE = tuple(s for s in TaskStatus if can_move(s, TaskStatus.RUNNING))
#: statuses redelivery moves to dispatched
DISPATCHABLE = tuple(s for s in TaskStatus if can_move(s, TaskStatus.DISPATCHED))
#: statuses an agent's ``done`` does not replace, unless decided by one of ``PRESUMED_BY``
SETTLED = tuple(s for s in TaskStatus if not may_settle(s, None))
#: who decided a final status that an agent's own verdict still replaces
PRESUMED_BY = tuple(v for v in Verdict if all(may_settle(s, v) for s in FINAL))

_START_SQL = (f"UPDATE tasks SET status='{TaskStatus.RUNNING}', started_at=? WHERE taskid=? "
              f"AND status IN {sql_list(STARTABLE)}")
# An agent's own verdict overrides one the master presumed (e.g. "went offline").
_DONE_SQL = ("UPDATE tasks SET status=?, exit_code=?, started_at=COALESCE(started_at, ?), finished_at=?, error=?, "
             f"truncated=?, final_source='{Verdict.AGENT}' WHERE taskid=? AND (status NOT IN {sql_list(SETTLED)} "
             f"OR final_source IN {sql_list(PRESUMED_BY)})")
_DISPATCHED_SQL = (f"UPDATE tasks SET status='{TaskStatus.DISPATCHED}' WHERE taskid=? "
                   f"AND status IN {sql_list(DISPATCHABLE)}")
#: the error of a task cancelled before any agent was sent it
CANCELLED_UNSENT = "cancelled before the agent received it"
_EVENT_SQL = "INSERT OR IGNORE INTO events(run_id, taskid, uuid, seq, kind, data) VALUES(?,?,?,?,?,?)"
_SAMPLE_SQL = ("INSERT OR IGNORE INTO samples(series, uuid, taskid, seq, time, status, fields, error) "
               "VALUES(?,?,?,?,?,?,?,?)")


class RunsSQL(SQLiteBase):
    def create_run(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float,
                   tasks: list[tuple[str, str, str, float]],
                   holder: tuple[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
        """Insert a run and its tasks ``(taskid, uuid, status, deadline)``.

        Tasks created already final (offline targets) get their ``done`` event here, so the
        SDK sees them like any other result. Returns those events. With ``holder``, as
        ``create_run_held``.
        """
        return self.create_run_held(run_id, cmd, args, timeout, tasks, holder)[0]

    def create_run_held(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float,
                        tasks: list[tuple[str, str, str, float]], holder: tuple[str, dict[str, int]] | None
                        ) -> tuple[list[dict[str, Any]], list[str]]:
        """As on PostgreSQL (one master here: the same check, in this one transaction, needs no
        lock): the done events, and the taskids stored dispatched."""
        now = time.time()
        events = []
        with self.transaction() as db:
            if holder is not None:
                tasks = self._held_only(tasks, holder)
            db.execute("INSERT INTO runs(id, cmd, args, timeout, created_at, total) VALUES(?,?,?,?,?,?)",
                       (run_id, cmd, js(args), timeout, now, len(tasks)))
            db.executemany(
                "INSERT INTO tasks(taskid, run_id, uuid, status, deadline, finished_at, final_source) "
                "VALUES(?,?,?,?,?,?,?)",
                [(tid, run_id, uuid, st, dl, now if st in FINAL else None, Verdict.MASTER if st in FINAL else None)
                 for tid, uuid, st, dl in tasks],
            )
            for tid, uuid, st, _ in tasks:
                if st in FINAL:
                    events.append(self._insert_event(run_id, tid, uuid, 0, "done",
                                                     {"status": st, "error": "agent is offline"}))
        return [e for e in events if e], [tid for tid, _, st, _ in tasks if st == TaskStatus.DISPATCHED]

    def _held_only(self, tasks: list[tuple[str, str, str, float]], holder: tuple[str, dict[str, int]]
                   ) -> list[tuple[str, str, str, float]]:
        me, epochs = holder
        wanted = sorted({uuid for _, uuid, st, _ in tasks if st == TaskStatus.DISPATCHED})
        held: set[str] = set()
        for part, marks in in_chunks(wanted):
            rows = self.db.execute(f"SELECT uuid, master_id, epoch FROM sessions WHERE uuid IN {marks}", part)
            held.update(r[0] for r in rows if r[1] == me and epochs.get(r[0]) == int(r[2]))
        return [(tid, uuid, TaskStatus.PENDING if st == TaskStatus.DISPATCHED and uuid not in held else st, dl)
                for tid, uuid, st, dl in tasks]

    def _insert_event(self, run_id: str, taskid: str, uuid: str, seq: int, kind: str,
                      data: dict[str, Any]) -> dict[str, Any] | None:
        cur = self.db.execute(_EVENT_SQL, (run_id, taskid, uuid, seq, kind, js(data)))
        if cur.rowcount == 0:
            return None
        return {"id": cur.lastrowid, "run_id": run_id, "taskid": taskid, "uuid": uuid, "seq": seq, "kind": kind}

    def task(self, taskid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT t.taskid, t.uuid, t.status, r.cmd FROM tasks t JOIN runs r ON r.id = t.run_id "
                              "WHERE t.taskid=?", (taskid,)).fetchone()
        return dict(row) if row else None

    def task_runs(self, taskids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """taskid -> (run_id, uuid) for the given task ids."""
        out: dict[str, tuple[str, str]] = {}
        for part, marks in in_chunks(list(set(taskids))):
            rows = self.db.execute(f"SELECT taskid, run_id, uuid FROM tasks WHERE taskid IN {marks}", part)
            out.update({r[0]: (r[1], r[2]) for r in rows})
        return out

    def ingest(self, batch: list[tuple[str, Result]]) -> tuple[dict[str, list[list[Any]]], set[str]]:
        """Persist messages from agents in one transaction, with one statement per kind of row
        (executemany): per-message statements were the ceiling of the fan-out at 1,000 agents.

        Returns the acknowledgements to send back per agent and the runs that changed.
        Messages about unknown tasks, or from an agent that is not the task's target, are
        acknowledged (so the agent stops resending) but not stored; resends already held are
        acknowledged and skipped.
        """
        # (parse checked every field read here: taskid a string, seq an integer, a final status;
        # a status is bound as a plain str: sqlite3 binds a StrEnum through its slow adapter path)
        owners = self.task_runs(m.taskid for _, m in batch)
        held = self._held_events(owners)
        acks: dict[str, list[list[Any]]] = {}
        changed: set[str] = set()
        events, starts, dones, samples = [], [], [], []
        for uuid, msg in batch:
            taskid, seq = msg.taskid, msg.seq
            acks.setdefault(uuid, []).append([taskid, seq])
            cls = type(msg)  # (identity: the message classes have no subclasses, and this loop is hot)
            if cls is Sample:
                msg = cast(Sample, msg)
                samples.append((msg.series, uuid, taskid, seq, msg.time, str(msg.status), js(msg.fields), msg.error))
                continue
            owner = owners.get(taskid)
            if owner is None or owner[1] != uuid or (taskid, seq) in held:
                continue
            held.add((taskid, seq))
            changed.add(owner[0])
            # the payload as it came: a newer agent's extra keys reach the SDK's events
            events.append((owner[0], taskid, uuid, seq, msg.T, js(msg.wire_payload())))
            if cls is Start:
                starts.append((cast(Start, msg).started_at, taskid))
            elif cls is Done:
                msg = cast(Done, msg)
                dones.append((str(msg.status), msg.exit_code, msg.started_at, msg.finished_at, msg.error,
                              js(msg.truncated), taskid))
        with self.transaction() as db:
            db.executemany(_EVENT_SQL, events)
            db.executemany(_START_SQL, starts)
            db.executemany(_DONE_SQL, dones)
            db.executemany(_SAMPLE_SQL, samples)
        return acks, changed

    def _held_events(self, owners: dict[str, tuple[str, str]]) -> set[tuple[str, int]]:
        """(taskid, seq) already stored for these tasks: resends to skip."""
        held: set[tuple[str, int]] = set()
        for part, marks in in_chunks(list(owners)):
            held.update((r[0], r[1]) for r in self.db.execute(f"SELECT taskid, seq FROM events WHERE taskid IN {marks}",
                                                              part))
        return held

    def open_tasks_for(self, uuid: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT t.taskid, t.run_id, t.status, t.cancel_requested, t.deadline, r.cmd, r.args, r.timeout "
            f"FROM tasks t JOIN runs r ON r.id=t.run_id WHERE t.uuid=? AND t.status NOT IN {FINAL_SQL}",
            (uuid,),
        )
        return [dict(r) for r in rows]

    def mark_dispatched(self, taskids: list[str]) -> None:
        self.db.executemany(_DISPATCHED_SQL, [(t,) for t in taskids])

    def claim_pending(self, taskids: list[str]) -> list[str]:
        """As on PostgreSQL: those still pending and not asked to cancel, now dispatched."""
        claimed: list[str] = []
        with self.transaction() as db:
            for part, marks in in_chunks(list(set(taskids))):
                rows = db.execute(f"UPDATE tasks SET status='{TaskStatus.DISPATCHED}' WHERE taskid IN {marks} "
                                  f"AND status='{TaskStatus.PENDING}' AND NOT cancel_requested RETURNING taskid",
                                  part).fetchall()
                claimed += [r[0] for r in rows]
        return sorted(claimed)

    def finish_by_master(self, items: list[tuple[str, str, str]]) -> set[str]:
        """Final status decided by the master ``(taskid, status, error)``; returns changed runs."""
        return self._finish(items, "")

    def finish_unheld(self, items: list[tuple[str, str, str]]) -> set[str]:
        """``finish_by_master`` only for tasks whose agent's session nobody holds."""
        return self._finish(items, " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.uuid = tasks.uuid "
                                   "AND s.master_id IS NOT NULL)")

    def _finish(self, items: list[tuple[str, str, str]], guard: str) -> set[str]:
        owners = self.task_runs(t for t, _, _ in items)
        changed = set()
        now = time.time()
        with self.transaction() as db:
            for taskid, status, error in items:
                cur = db.execute(
                    f"UPDATE tasks SET status=?, error=?, finished_at=?, final_source='{Verdict.MASTER}' "
                    f"WHERE taskid=? AND status NOT IN {FINAL_SQL}{guard}",
                    (status, error, now, taskid),
                )
                if cur.rowcount and taskid in owners:
                    run_id, uuid = owners[taskid]
                    # seq -1 marks a verdict of the master's; agents' seqs start at 0
                    self._insert_event(run_id, taskid, uuid, -1, "done", {"status": status, "error": error})
                    changed.add(run_id)
        return changed

    def request_cancel(self, run_id: str) -> list[dict[str, Any]]:
        self.db.execute(f"UPDATE tasks SET cancel_requested=1 WHERE run_id=? AND status NOT IN {FINAL_SQL}",
                        (run_id,))
        rows = self.db.execute(
            f"SELECT taskid, uuid, status FROM tasks WHERE run_id=? AND status NOT IN {FINAL_SQL}", (run_id,)
        )
        return [dict(r) for r in rows]

    def cancel_pending(self, run_id: str) -> tuple[list[dict[str, Any]], set[str]]:
        """As on PostgreSQL, in one transaction: the open tasks left, and the runs that changed."""
        now = time.time()
        with self.transaction() as db:
            db.execute(f"UPDATE tasks SET cancel_requested=1 WHERE run_id=? AND status NOT IN {FINAL_SQL}", (run_id,))
            done = db.execute(
                f"UPDATE tasks SET status='{TaskStatus.CANCELLED}', error=?, finished_at=?, "
                f"final_source='{Verdict.MASTER}' WHERE run_id=? AND status='{TaskStatus.PENDING}' "
                "RETURNING taskid, uuid", (CANCELLED_UNSENT, now, run_id)).fetchall()
            for taskid, uuid in sorted((r[0], r[1]) for r in done):
                self._insert_event(run_id, taskid, uuid, -1, "done",
                                   {"status": TaskStatus.CANCELLED, "error": CANCELLED_UNSENT})
            left = db.execute(f"SELECT taskid, uuid, status FROM tasks WHERE run_id=? AND status NOT IN "
                              f"{FINAL_SQL} ORDER BY taskid", (run_id,)).fetchall()
        return [dict(r) for r in left], {run_id} if done else set()

    def overdue_tasks(self, now: float) -> list[dict[str, Any]]:
        rows = self.db.execute(
            f"SELECT taskid, uuid, status FROM tasks WHERE deadline < ? AND status NOT IN {FINAL_SQL}", (now,)
        )
        return [dict(r) for r in rows]

    def open_task_agents(self) -> list[str]:
        rows = self.db.execute(f"SELECT DISTINCT uuid FROM tasks WHERE status NOT IN {FINAL_SQL}")
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
        row = self.db.execute(f"SELECT COUNT(*) FROM tasks WHERE run_id=? AND status NOT IN {FINAL_SQL}", (run_id,))
        return int(row.fetchone()[0])

    def events_after(self, run_id: str, cursor: int, limit: int = 2000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, taskid, uuid, seq, kind, data FROM events WHERE run_id=? AND id>? ORDER BY id LIMIT ?",
            (run_id, cursor, limit),
        )
        return [dict(r) for r in rows]

    def run_outcomes(self, run_id: str) -> dict[str, dict[str, Any]]:
        """uuid -> ``{status, error, result}`` of each task of the run; ``result`` from the
        agent's own ``done`` (a verdict of the master's has none)."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.db.execute("SELECT taskid, uuid, status, error FROM tasks WHERE run_id=?", (run_id,)):
            out[t["uuid"]] = {"status": t["status"], "error": t["error"], "result": None}
        for e in self.db.execute("SELECT uuid, data FROM events WHERE run_id=? AND kind='done' AND seq>=0 "
                                 "ORDER BY id", (run_id,)):
            if e["uuid"] in out:
                out[e["uuid"]]["result"] = loads(e["data"]).get("result")
        return out
