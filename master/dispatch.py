"""Runs and their tasks, from the master to the agents: creating a run (one task per chosen
agent, stored before it is sent), cancelling one, redelivering what an agent has not
acknowledged when it comes back, and writing off tasks whose agent stayed away or overran.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from hcsdk.protocol.wire import dumps, loads

from .db import Db
from .errors import RequestRejected
from .run_events import RunEvents
from .sessions import Session, Sessions
from .settings import MasterSettings
from .targets import resolve

__all__ = ["KNOWN_CMDS", "SYSTEM_CMDS", "Dispatch", "check_cmd"]

#: built into every agent; any other cmd word names a plugin, which the agent may or may not have
KNOWN_CMDS = ("shell", "exec", "ping", "facts", "echo")
#: what the agent itself does, on the master's signed word (plugins, updates, schedules)
SYSTEM_CMDS = ("zy.plugin.install", "zy.plugin.remove", "zy.plugins", "zy.update", "zy.schedule.set",
               "zy.schedule.cancel", "zy.schedules", "zy.release.fetch", "zy.release.place", "zy.release.rollback")
_CMD_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


def check_cmd(cmd: str) -> None:
    if cmd.startswith("zy."):
        if cmd not in SYSTEM_CMDS:
            raise RequestRejected(f"unknown system cmd {cmd!r} (known: {', '.join(SYSTEM_CMDS)})", kind="cmd")
    elif len(cmd) > 64 or not _CMD_RE.match(cmd):
        raise RequestRejected(f"cmd {cmd!r} is not a cmd word: lowercase letters, digits and _ in dot-separated "
                              f"parts (built in: {', '.join(KNOWN_CMDS)}; others name plugins)", kind="cmd")


class Dispatch:
    def __init__(self, db: Db, settings: MasterSettings, table: Sessions, events: RunEvents,
                 stats: dict[str, int]) -> None:
        self.db = db
        self.settings = settings
        self.table = table
        self.events = events
        self.stats = stats

    def task_msg(self, uuid: str, taskid: str, cmd: str, args: dict[str, Any], timeout: float,
                 deadline: float) -> dict[str, Any]:
        # exp and aud make a captured command useless later or for another agent; the MAC
        # makes it impossible to alter or forge on the way
        return self.table.sign({"t": "task", "uuid": uuid, "cmd": cmd, "taskid": taskid, "seq": 0,
                                "p": {"args": args, "timeout": timeout, "exp": deadline, "aud": uuid}})

    def cancel_msg(self, uuid: str, taskid: str, cmd: str = "") -> dict[str, Any]:
        return self.table.sign({"t": "cancel", "uuid": uuid, "cmd": cmd, "taskid": taskid, "seq": 0})

    async def redeliver(self, session: Session) -> None:
        """What the store holds open for a (re)connected agent: its tasks and cancels again."""
        tasks = await self.db(self.db.store.open_tasks_for, session.uuid)
        msgs, sent = [], []
        for t in tasks:
            if t["cancel_requested"]:
                msgs.append(self.cancel_msg(session.uuid, t["taskid"], t["cmd"]))
            elif t["status"] in ("pending", "dispatched"):
                msgs.append(self.task_msg(session.uuid, t["taskid"], t["cmd"], loads(t["args"]), t["timeout"],
                                          t["deadline"]))
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
        rows = []
        for i, agent in enumerate(chosen):
            online = agent["uuid"] in sessions
            rows.append((f"{run_id}.{i}", agent["uuid"], "dispatched" if online else "offline", deadline))
        await self.db(self.db.store.create_run, run_id, cmd, args, timeout, rows)
        # Tasks are stored as dispatched before they are sent: if this session drops before the
        # agent sees them, the next handshake redelivers them.
        for taskid, uuid, status, _ in rows:
            session = sessions.get(uuid)
            if status == "dispatched" and session:
                session.send([self.task_msg(uuid, taskid, cmd, args, timeout, deadline)])
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
        unreachable = []
        for t in open_tasks:
            session = self.table.sessions.get(t["uuid"])
            if t["status"] == "pending":
                unreachable.append((t["taskid"], "cancelled", "cancelled before the agent received it"))
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
                if t["status"] == "running":
                    verdicts.append((t["taskid"], "error", "agent went offline while the task ran"))
                else:
                    verdicts.append((t["taskid"], "offline", "agent is offline"))
        for t in await self.db(self.db.store.overdue_tasks, time.time()):
            verdicts.append((t["taskid"], "error", "no result from the agent within the timeout"))
        if verdicts:
            self.events.notify(await self.db(self.db.store.finish_by_master, verdicts))
