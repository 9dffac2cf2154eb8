"""Runs and their tasks, from the master to the agents: creating a run (one task per chosen
agent, stored before it is sent), cancelling one, redelivering what an agent has not
acknowledged when it comes back, and writing off tasks whose agent stayed away or overran.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from hcsdk.protocol import vocab
from hcsdk.protocol.errors import MessageError
from hcsdk.protocol.messages import Cancel, Task
from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.wire import dumps, loads

from .errors import RequestRejected
from .run_events import RunEvents
from .sessions import Session, Sessions
from .settings import MasterSettings
from .store import StoreThread
from .targets import resolve

__all__ = ["Dispatch", "check_cmd"]


def check_cmd(cmd: str) -> None:
    """Refuse, as a request the SDK made, a cmd the master must not send."""
    try:
        vocab.check_cmd(cmd)
    except MessageError as exc:
        raise RequestRejected(exc.reason, kind="cmd") from None


class Dispatch:
    def __init__(self, db: StoreThread, settings: MasterSettings, table: Sessions, events: RunEvents,
                 stats: dict[str, int]) -> None:
        self.db = db
        self.settings = settings
        self.table = table
        self.events = events
        self.stats = stats

    def task_msg(self, uuid: str, taskid: str, cmd: str, args: dict[str, Any], timeout: float,
                 deadline: float, run: str) -> dict[str, Any]:
        # exp and aud make a captured command useless later or for another agent; the MAC
        # makes it impossible to alter or forge on the way
        task = Task(uuid=uuid, cmd=cmd, taskid=taskid, args=args, timeout=timeout, exp=deadline, aud=uuid, run=run)
        return task.signed_wire(self.table.key(uuid))

    def cancel_msg(self, uuid: str, taskid: str, cmd: str = "") -> dict[str, Any]:
        return Cancel(uuid=uuid, cmd=cmd, taskid=taskid).signed_wire(self.table.key(uuid))

    async def redeliver(self, session: Session) -> None:
        """What the store holds open for a (re)connected agent: its tasks and cancels again."""
        tasks = await self.db(self.db.store.open_tasks_for, session.uuid)
        msgs, sent = [], []
        for t in tasks:
            if t["cancel_requested"]:
                msgs.append(self.cancel_msg(session.uuid, t["taskid"], t["cmd"]))
            elif t["status"] in (TaskStatus.PENDING, TaskStatus.DISPATCHED):
                msgs.append(self.task_msg(session.uuid, t["taskid"], t["cmd"], loads(t["args"]), t["timeout"],
                                          t["deadline"], t["run_id"]))
                sent.append(t["taskid"])
        if msgs:
            session.send(msgs)
            await self.db(self.db.store.mark_dispatched, sent)

    # -- runs ---------------------------------------------------------------------------------
    async def create_run(self, cmd: str, args: dict[str, Any], targets: Any, timeout: float) -> dict[str, Any]:
        check_cmd(cmd)
        self._check_size(args)
        agents = await self.db(self.db.store.target_rows)
        try:
            chosen = resolve(targets, agents)
        except ValueError as exc:
            raise RequestRejected(str(exc), kind="target") from None
        run_id = "r" + secrets.token_hex(6)
        deadline = time.time() + timeout + self.settings.result_grace
        sessions = self.table.sessions
        rows: list[tuple[str, str, TaskStatus, float]] = []
        for i, agent in enumerate(chosen):
            online = agent["uuid"] in sessions
            rows.append((f"{run_id}.{i}", agent["uuid"], TaskStatus.DISPATCHED if online else TaskStatus.OFFLINE,
                         deadline))
        await self.db(self.db.store.create_run, run_id, cmd, args, timeout, rows)
        # Tasks are stored as dispatched before they are sent: if this session drops before the
        # agent sees them, the next handshake redelivers them.
        for taskid, uuid, status, _ in rows:
            session = sessions.get(uuid)
            if status == TaskStatus.DISPATCHED and session:
                session.send([self.task_msg(uuid, taskid, cmd, args, timeout, deadline, run_id)])
                self.stats["dispatched"] += 1
        self.events.notify({run_id})
        return {
            "run_id": run_id, "cmd": cmd, "timeout": timeout,
            "targets": [{"uuid": a["uuid"], "hostname": a["hostname"], "taskid": r[0], "status": r[2]}
                        for a, r in zip(chosen, rows, strict=True)],
        }

    def _check_size(self, args: dict[str, Any]) -> None:
        try:
            size = len(dumps(args))
        except (TypeError, ValueError) as exc:
            raise RequestRejected(f"the command's arguments cannot be encoded: {exc}") from None
        if size > self.settings.max_frame - 1024:
            raise RequestRejected(f"the command's arguments take {size} bytes; at most "
                                  f"{self.settings.max_frame - 1024} fit in one message", status=413)

    async def cancel_run(self, run_id: str) -> int:
        if not await self.db(self.db.store.run_exists, run_id):
            raise RequestRejected(f"no run {run_id!r}", kind="run", status=404)
        open_tasks = await self.db(self.db.store.request_cancel, run_id)
        unreachable: list[tuple[str, str, str]] = []
        for t in open_tasks:
            session = self.table.sessions.get(t["uuid"])
            if t["status"] == TaskStatus.PENDING:
                unreachable.append((t["taskid"], TaskStatus.CANCELLED, "cancelled before the agent received it"))
            elif session:
                session.send([self.cancel_msg(t["uuid"], t["taskid"])])
            # else: the agent may be running it; the cancel goes out when it reconnects
        if unreachable:
            self.events.notify(await self.db(self.db.store.finish_by_master, unreachable))
        return len(open_tasks)

    # -- verdicts -----------------------------------------------------------------------------
    async def write_off(self, now: float) -> None:
        """Final verdicts of the master: the open tasks of agents offline beyond the grace, and
        tasks past their deadline with no result."""
        verdicts: list[tuple[str, str, str]] = []
        for uuid, since in self.table.offline_clocks():
            # the awaits below let handshakes run: an agent may have come back meanwhile
            if now - since < self.settings.offline_grace or not self.table.stop_clock(uuid, since):
                continue
            for t in await self.db(self.db.store.open_tasks_for, uuid):
                if t["status"] == TaskStatus.RUNNING:
                    verdicts.append((t["taskid"], TaskStatus.ERROR, "agent went offline while the task ran"))
                else:
                    verdicts.append((t["taskid"], TaskStatus.OFFLINE, "agent is offline"))
        for t in await self.db(self.db.store.overdue_tasks, time.time()):
            verdicts.append((t["taskid"], TaskStatus.ERROR, "no result from the agent within the timeout"))
        if verdicts:
            self.events.notify(await self.db(self.db.store.finish_by_master, verdicts))
