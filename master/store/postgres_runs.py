"""PostgreSQL: runs, their tasks and the events agents send about them (as sqlite_runs.py).

Writers of events lock their runs' rows first (``PostgresBase.lock_runs``) so that within a run
event ids are in commit order, whichever master or thread writes them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

from hcsdk.protocol.messages import Done, Sample, Start
from hcsdk.protocol.tasks import FINAL, TaskStatus, Verdict
from hcsdk.protocol.wire import loads

from .postgres_base import FINAL_SQL, Conn, PostgresBase, clean, clean_or_none, js, sql_list
from .protocol import Result
from .sqlite_runs import CANCELLED_UNSENT, DISPATCHABLE, PRESUMED_BY, SETTLED, STARTABLE

# the batched writes of ingest, from its staging tables (postgres_base._STAGING)
_START_SQL = (f"UPDATE tasks t SET status='{TaskStatus.RUNNING}', started_at=v.started_at FROM zy_starts v "
              f"WHERE t.taskid=v.taskid AND t.status IN {sql_list(STARTABLE)}")
# An agent's own verdict overrides one the master presumed (e.g. "went offline").
_DONE_SQL = ("UPDATE tasks t SET status=v.status, exit_code=v.exit_code, "
             "started_at=COALESCE(t.started_at, v.started_at), finished_at=v.finished_at, error=v.error, "
             "truncated=v.truncated, "
             f"final_source='{Verdict.AGENT}' FROM zy_dones v WHERE t.taskid=v.taskid "
             f"AND (t.status NOT IN {sql_list(SETTLED)} OR t.final_source IN {sql_list(PRESUMED_BY)})")
_SAMPLES_SQL = ("INSERT INTO samples(series, uuid, taskid, seq, time, status, fields, error) "
                "SELECT series, uuid, taskid, seq, time, status, fields, error FROM zy_samples ON CONFLICT DO NOTHING")
_DISPATCHED_SQL = (f"UPDATE tasks SET status='{TaskStatus.DISPATCHED}' WHERE taskid = ANY(%s) "
                   f"AND status IN {sql_list(DISPATCHABLE)}")
_LOCK_TASK_RUNS_SQL = ("SELECT 1 FROM runs WHERE id IN (SELECT run_id FROM tasks WHERE taskid = ANY(%s)) "
                       "ORDER BY id FOR UPDATE")
# events the master writes itself (few: offline targets, verdicts), their ids returned
_EVENTS_SQL = ("INSERT INTO events(run_id, taskid, uuid, seq, kind, data) "
               "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::text[], %s::text[]) "
               "ON CONFLICT DO NOTHING RETURNING id, run_id, taskid, uuid, seq, kind")
_MASTER_FINAL_SQL = (
    f"UPDATE tasks t SET status=v.status, error=v.error, finished_at=%s, final_source='{Verdict.MASTER}' "
    "FROM unnest(%s::text[], %s::text[], %s::text[]) AS v(taskid, status, error) "
    f"WHERE t.taskid=v.taskid AND t.status NOT IN {FINAL_SQL} RETURNING t.taskid, t.run_id, t.uuid, v.status, v.error"
)

_UNHELD_FINAL_SQL = _MASTER_FINAL_SQL.replace(
    " RETURNING", " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.uuid = t.uuid AND s.master_id IS NOT NULL) "
    "RETURNING")
_CLAIM_PENDING_SQL = (f"UPDATE tasks SET status='{TaskStatus.DISPATCHED}' WHERE taskid = ANY(%s) "
                      f"AND status='{TaskStatus.PENDING}' AND NOT cancel_requested RETURNING taskid")
_CANCEL_PENDING_SQL = (
    f"UPDATE tasks t SET status='{TaskStatus.CANCELLED}', error=%s, finished_at=%s, final_source='{Verdict.MASTER}' "
    f"WHERE t.run_id=%s AND t.status='{TaskStatus.PENDING}' "
    "RETURNING t.taskid, t.run_id, t.uuid, t.status, t.error"
)


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column (what ``unnest`` takes)."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def _num(value: float | None) -> float | None:
    """A time as a float: an array of float8 takes no int."""
    return None if value is None else float(value)


class PostgresRunsSQL(PostgresBase):
    def create_run(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float,
                   tasks: list[tuple[str, str, str, float]],
                   holder: tuple[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
        """Insert a run and its tasks ``(taskid, uuid, status, deadline)``; tasks created already
        final (offline targets) get their ``done`` event here. Returns those events. With
        ``holder``, as ``create_run_held``. (The run's row is new, so it is this transaction's
        until it commits: no other writer can add events to the run before these.)"""
        return self.create_run_held(run_id, cmd, args, timeout, tasks, holder)[0]

    def create_run_held(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float,
                        tasks: list[tuple[str, str, str, float]], holder: tuple[str, dict[str, int]] | None
                        ) -> tuple[list[dict[str, Any]], list[str]]:
        """``create_run``, and with ``holder`` = (this master's id, {uuid: the epoch its local
        session holds}) a task given as dispatched is stored dispatched only if its agent's
        session is still this master's at that epoch, else pending (its holder sends it). The
        sessions are read FOR SHARE in this transaction: a claim elsewhere (an UPDATE of the
        row) waits for the commit, so its redelivery reads these tasks; a claim committed first
        is seen here. Returns the done events and the taskids stored dispatched (the ones the
        caller sends now)."""
        now = time.time()
        master = str(Verdict.MASTER)
        final = [(run_id, tid, uuid, 0, "done", js({"status": st, "error": "agent is offline"}))
                 for tid, uuid, st, _ in tasks if st in FINAL]
        with self.transaction() as conn:
            if holder is not None:
                tasks = self._held_only(conn, tasks, holder)
            rows = [(tid, run_id, uuid, str(st), float(dl), now if st in FINAL else None,
                     master if st in FINAL else None) for tid, uuid, st, dl in tasks]
            conn.execute("INSERT INTO runs(id, cmd, args, timeout, created_at, total) VALUES(%s,%s,%s,%s,%s,%s)",
                         (run_id, cmd, js(args), timeout, now, len(tasks)))
            self.copy_in(conn, "tasks(taskid, run_id, uuid, status, deadline, finished_at, final_source)", rows)
            events = self._insert_events(conn, final)
        return events, [tid for tid, _, st, _ in tasks if st == TaskStatus.DISPATCHED]

    @staticmethod
    def _held_only(conn: Conn, tasks: list[tuple[str, str, str, float]], holder: tuple[str, dict[str, int]]
                   ) -> list[tuple[str, str, str, float]]:
        """``tasks`` with those given as dispatched whose session ``holder`` no longer holds at
        its epoch made pending; the sessions locked FOR SHARE (in uuid order) till the commit."""
        me, epochs = holder
        wanted = sorted({uuid for _, uuid, st, _ in tasks if st == TaskStatus.DISPATCHED})
        held: set[str] = set()
        if wanted:
            rows = conn.execute("SELECT uuid, master_id, epoch FROM sessions WHERE uuid = ANY(%s) ORDER BY uuid "
                                "FOR SHARE", (wanted,)).fetchall()
            held = {r["uuid"] for r in rows if r["master_id"] == me and epochs.get(r["uuid"]) == int(r["epoch"])}
        return [(tid, uuid, TaskStatus.PENDING if st == TaskStatus.DISPATCHED and uuid not in held else st, dl)
                for tid, uuid, st, dl in tasks]

    @staticmethod
    def _insert_events(conn: Conn, rows: list[tuple[str, str, str, int, str, str]]) -> list[dict[str, Any]]:
        """Insert events ``(run_id, taskid, uuid, seq, kind, data)``; those inserted, as
        ``{id, run_id, taskid, uuid, seq, kind}`` in id order."""
        if not rows:
            return []
        got = conn.execute(_EVENTS_SQL, _columns(rows, 6))
        return sorted(got.fetchall(), key=lambda e: int(e["id"]))

    def task(self, taskid: str) -> dict[str, Any] | None:
        return self.one("SELECT t.taskid, t.uuid, t.status, r.cmd FROM tasks t JOIN runs r ON r.id = t.run_id "
                        "WHERE t.taskid=%s", (clean(taskid),))

    def task_runs(self, taskids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """taskid -> (run_id, uuid) for the given task ids."""
        ids = list({clean(t) for t in taskids})
        if not ids:
            return {}
        rows = self.all("SELECT taskid, run_id, uuid FROM tasks WHERE taskid = ANY(%s)", (ids,))
        return {r["taskid"]: (r["run_id"], r["uuid"]) for r in rows}

    def ingest(self, batch: list[tuple[str, Result]]) -> tuple[dict[str, list[list[Any]]], set[str]]:
        """Persist messages from agents in one transaction, rows in by COPY: measured on a
        5,000-message batch, about 110 ms and 45 ms of the master's CPU, where executemany in
        pipeline mode (or the events as unnest() arrays) took twice as long and 2.5 times the CPU.

        Returns the acknowledgements to send back per agent and the runs that changed.
        Messages about unknown tasks, or from an agent that is not the task's target, are
        acknowledged (so the agent stops resending) but not stored; resends already held are
        acknowledged and skipped. Which are held is read after the runs are locked: every writer
        of a run's events holds its lock, so the events copied in cannot collide with another
        master's.
        """
        owners = self.task_runs(m.taskid for _, m in batch)
        acks: dict[str, list[list[Any]]] = {}
        mine: list[tuple[str, str, Result]] = []
        samples: list[tuple[Any, ...]] = []
        for uuid, msg in batch:
            acks.setdefault(uuid, []).append([msg.taskid, msg.seq])
            if type(msg) is Sample:  # (identity: the message classes have no subclasses; this loop is hot)
                samples.append((clean(msg.series), uuid, clean(msg.taskid), msg.seq, float(msg.time),
                                str(msg.status), js(msg.fields), clean_or_none(msg.error)))
                continue
            owner = owners.get(msg.taskid)
            if owner is not None and owner[1] == uuid:
                mine.append((owner[0], uuid, msg))
        changed: set[str] = set()
        with self.transaction(staging=True) as conn:
            self.lock_runs(conn, {run_id for run_id, _, _ in mine})
            held = self._held_events(conn, {m.taskid for _, _, m in mine})
            events, starts, dones = self._new_rows(mine, held, changed)
            self.copy_in(conn, "events(run_id, taskid, uuid, seq, kind, data)", events)
            if starts:
                self.copy_in(conn, "zy_starts(started_at, taskid)", starts)
                conn.execute(_START_SQL)
            if dones:
                self.copy_in(conn, "zy_dones(status, exit_code, started_at, finished_at, error, truncated, taskid)",
                             dones)
                conn.execute(_DONE_SQL)
            if samples:
                self.copy_in(conn, "zy_samples(series, uuid, taskid, seq, time, status, fields, error)", samples)
                conn.execute(_SAMPLES_SQL)
        return acks, changed

    @staticmethod
    def _new_rows(mine: list[tuple[str, str, Result]], held: set[tuple[str, int]], changed: set[str]
                  ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The events, starts and dones of the messages ``(run_id, uuid, msg)`` not ``held`` yet; the
        runs they change are added to ``changed``. Of one task's starts (or dones) in a batch the
        first counts, as it would one statement after another (the first moves the task on)."""
        events, starts, dones = [], [], []
        started: set[str] = set()
        finished: set[str] = set()
        for run_id, uuid, msg in mine:
            taskid, seq = msg.taskid, msg.seq
            if (taskid, seq) in held:
                continue
            held.add((taskid, seq))
            changed.add(run_id)
            # the payload as it came: a newer agent's extra keys reach the SDK's events
            events.append((run_id, taskid, uuid, seq, msg.T, js(msg.wire_payload())))
            cls = type(msg)
            if cls is Start and taskid not in started:
                started.add(taskid)
                starts.append((_num(cast(Start, msg).started_at), taskid))
            elif cls is Done and taskid not in finished:
                finished.add(taskid)
                done = cast(Done, msg)
                dones.append((str(done.status), done.exit_code, _num(done.started_at), _num(done.finished_at),
                              clean_or_none(done.error), js(done.truncated), taskid))
        return events, starts, dones

    @staticmethod
    def _held_events(conn: Conn, taskids: set[str]) -> set[tuple[str, int]]:
        """(taskid, seq) already stored for these tasks: resends to skip."""
        if not taskids:
            return set()
        rows = conn.execute("SELECT taskid, seq FROM events WHERE taskid = ANY(%s)", (list(taskids),))
        return {(r["taskid"], r["seq"]) for r in rows}

    def open_tasks_for(self, uuid: str) -> list[dict[str, Any]]:
        rows = self.all(
            "SELECT t.taskid, t.run_id, t.status, t.cancel_requested::int AS cancel_requested, t.deadline, r.cmd, "
            f"r.args, r.timeout FROM tasks t JOIN runs r ON r.id=t.run_id WHERE t.uuid=%s AND t.status NOT IN "
            f"{FINAL_SQL}", (uuid,),
        )
        return rows

    def mark_dispatched(self, taskids: list[str]) -> None:
        """Their runs' rows are locked first, as every other writer of tasks does (ingest,
        finish_by_master, request_cancel): writers of one run's tasks take turns, so their row
        locks on the tasks cannot deadlock whatever order each statement takes them in."""
        if taskids:
            with self.transaction() as conn:
                conn.execute(_LOCK_TASK_RUNS_SQL, (taskids,))
                conn.execute(_DISPATCHED_SQL, (taskids,))

    def claim_pending(self, taskids: list[str]) -> list[str]:
        """Of ``taskids``, those still pending and not asked to cancel, now dispatched: the ones
        the caller may send (a cancel_pending of their run either came first and they are not
        here, or waits for this and then sends their cancels)."""
        if not taskids:
            return []
        with self.transaction() as conn:
            conn.execute(_LOCK_TASK_RUNS_SQL, (list(taskids),))
            rows = conn.execute(_CLAIM_PENDING_SQL, (list(taskids),)).fetchall()
        return sorted(r["taskid"] for r in rows)

    def finish_by_master(self, items: list[tuple[str, str, str]]) -> set[str]:
        """Final status decided by the master ``(taskid, status, error)``; returns changed runs.
        Of one task given twice the first counts (as one statement after another would)."""
        return self._finish(items, _MASTER_FINAL_SQL)

    def finish_unheld(self, items: list[tuple[str, str, str]]) -> set[str]:
        """``finish_by_master`` only for tasks whose agent's session nobody holds when the
        verdict is written (a master that claimed it since delivers the task instead)."""
        return self._finish(items, _UNHELD_FINAL_SQL)

    def _finish(self, items: list[tuple[str, str, str]], statement: str) -> set[str]:
        first: dict[str, tuple[str, str]] = {}
        for taskid, status, error in items:
            first.setdefault(taskid, (str(status), error))
        if not first:
            return set()
        ids = sorted(first)
        with self.transaction() as conn:
            conn.execute(_LOCK_TASK_RUNS_SQL, (ids,))
            done = conn.execute(statement, (time.time(), ids, [first[t][0] for t in ids],
                                            [first[t][1] for t in ids])).fetchall()
            self._master_events(conn, done)
        return {r["run_id"] for r in done}

    def _master_events(self, conn: Conn, done: list[dict[str, Any]]) -> None:
        # seq -1 marks a verdict of the master's; agents' seqs start at 0
        self._insert_events(conn, [(r["run_id"], r["taskid"], r["uuid"], -1, "done",
                                    js({"status": r["status"], "error": r["error"]})) for r in done])

    def request_cancel(self, run_id: str) -> list[dict[str, Any]]:
        with self.transaction() as conn:
            self.lock_runs(conn, [run_id])
            conn.execute(f"UPDATE tasks SET cancel_requested=true WHERE run_id=%s AND status NOT IN {FINAL_SQL}",
                         (run_id,))
            return conn.execute(f"SELECT taskid, uuid, status FROM tasks WHERE run_id=%s AND status NOT IN "
                                f"{FINAL_SQL}", (run_id,)).fetchall()

    def cancel_pending(self, run_id: str) -> tuple[list[dict[str, Any]], set[str]]:
        """``request_cancel`` with the verdict on pending tasks in the same transaction: its
        open tasks asked to cancel, those still pending finished ``cancelled before the agent
        received it`` (no claim_pending can take one in between: both lock the run's row).
        Returns the open tasks left (``taskid, uuid, status``: dispatched or running, whose
        cancels go out) and the runs that changed."""
        with self.transaction() as conn:
            self.lock_runs(conn, [run_id])
            conn.execute(f"UPDATE tasks SET cancel_requested=true WHERE run_id=%s AND status NOT IN {FINAL_SQL}",
                         (run_id,))
            done = conn.execute(_CANCEL_PENDING_SQL, (CANCELLED_UNSENT, time.time(), run_id)).fetchall()
            self._master_events(conn, done)
            left = conn.execute(f"SELECT taskid, uuid, status FROM tasks WHERE run_id=%s AND status NOT IN "
                                f"{FINAL_SQL} ORDER BY taskid", (run_id,)).fetchall()
        return left, {r["run_id"] for r in done}

    def overdue_tasks(self, now: float) -> list[dict[str, Any]]:
        return self.all(f"SELECT taskid, uuid, status FROM tasks WHERE deadline < %s AND status NOT IN {FINAL_SQL}",
                        (now,))

    def open_task_agents(self) -> list[str]:
        return [r["uuid"] for r in self.all(f"SELECT DISTINCT uuid FROM tasks WHERE status NOT IN {FINAL_SQL}")]

    def run(self, run_id: str) -> dict[str, Any] | None:
        with self.connection() as conn:
            rec = conn.execute("SELECT * FROM runs WHERE id=%s", (run_id,)).fetchone()
            if not rec:
                return None
            tasks = conn.execute("SELECT t.*, a.hostname FROM tasks t LEFT JOIN agents a ON a.uuid=t.uuid "
                                 "WHERE run_id=%s ORDER BY taskid", (run_id,)).fetchall()
        rec["args"] = loads(rec["args"])
        for t in tasks:
            t["cancel_requested"] = int(t["cancel_requested"])  # 0/1, as the SQLite store gives it
        rec["tasks"] = tasks
        rec["open"] = sum(1 for t in tasks if t["status"] not in FINAL)
        return rec

    def run_exists(self, run_id: str) -> bool:
        return self.one("SELECT 1 FROM runs WHERE id=%s", (run_id,)) is not None

    def run_open_count(self, run_id: str) -> int:
        row = self.one(f"SELECT COUNT(*) AS n FROM tasks WHERE run_id=%s AND status NOT IN {FINAL_SQL}", (run_id,))
        return int(row["n"]) if row else 0

    def events_after(self, run_id: str, cursor: int, limit: int = 2000) -> list[dict[str, Any]]:
        return self.all("SELECT id, taskid, uuid, seq, kind, data FROM events WHERE run_id=%s AND id>%s "
                        "ORDER BY id LIMIT %s", (run_id, cursor, limit))

    def run_outcomes(self, run_id: str) -> dict[str, dict[str, Any]]:
        """uuid -> ``{status, error, result}`` of each task of the run; ``result`` from the
        agent's own ``done`` (a verdict of the master's has none)."""
        out: dict[str, dict[str, Any]] = {}
        with self.connection() as conn:
            for t in conn.execute("SELECT taskid, uuid, status, error FROM tasks WHERE run_id=%s", (run_id,)):
                out[t["uuid"]] = {"status": t["status"], "error": t["error"], "result": None}
            for e in conn.execute("SELECT uuid, data FROM events WHERE run_id=%s AND kind='done' AND seq>=0 "
                                  "ORDER BY id", (run_id,)):
                if e["uuid"] in out:
                    out[e["uuid"]]["result"] = loads(e["data"]).get("result")
        return out
