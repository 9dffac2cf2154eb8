"""Runs and their tasks, from the master to the agents: creating a run (one task per chosen
agent, stored before it is sent), cancelling one, redelivering what an agent has not
acknowledged when it comes back, and writing off tasks whose agent stayed away or overran.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from hcsdk.protocol import vocab
from hcsdk.protocol.errors import MessageError
from hcsdk.protocol.messages import Cancel, Task
from hcsdk.protocol.names import new_run_id
from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.wire import dumps, loads

from .errors import RequestRejected
from .run_events import RunEvents
from .sessions import Session, Sessions
from .settings import MasterSettings
from .store import Coalesced, CoalescedSubsets, StoreThread
from .targets import resolve

__all__ = ["Dispatch", "Placement", "check_cmd", "new_run_id"]


class Placement(Protocol):
    """Where agents this master does not hold are held (the cluster, ``master.cluster``)."""

    @property
    def master_id(self) -> str: ...

    async def elsewhere(self, uuids: list[str]) -> dict[str, str]:
        """uuid -> the live master (not this one) whose session holds it, for those held so."""
        ...

    def wake_dispatch(self, master_ids: set[str], run_id: str) -> None:
        """Tell ``master_ids`` that ``run_id`` has tasks (or cancels) for agents they hold."""
        ...


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
        #: set with several masters on one store: targets held by another master go ``pending``
        #: and that master is woken to send them
        self.placement: Placement | None = None
        #: what reconnecting agents get again, read and marked sent a batch at a time (a storm
        #: of thousands of handshakes; master/store/offload.py says why)
        self._open_tasks = Coalesced(db, db.store.open_tasks_for)
        self._claim_pending = CoalescedSubsets(db, db.store.claim_pending)

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
        tasks = await self._open_tasks(session.uuid)
        pending = [t["taskid"] for t in tasks if t["status"] == TaskStatus.PENDING and not t["cancel_requested"]]
        if pending:
            # a pending task goes out only once claimed (pending -> dispatched in one statement):
            # a cancel meanwhile, or another master sending it, leaves it out here
            claimed = set(await self._claim_pending(pending))
            tasks = [t for t in tasks if t["status"] != TaskStatus.PENDING or t["taskid"] in claimed]
        # no store write after sending: what goes out is dispatched already (the pending ones
        # by their claim), and a write here took the run's row lock per reconnecting agent,
        # queueing a storm's redeliveries behind the run's result batches
        self._send_open(session, tasks)

    async def replay(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The answer that created run ``run_id`` again, when it exists (a client resending its
        request after a master died); None when it does not. The same id with another command is
        refused: the client reused an id."""
        rec = await self.db(self.db.store.run, run_id)
        if rec is None:
            return None
        if (rec["cmd"], rec["args"], float(rec["timeout"])) != (cmd, args, float(timeout)):
            raise RequestRejected(f"run {run_id} exists with another command; a run id names one request",
                                  kind="run", status=409)
        tasks = sorted(rec["tasks"], key=lambda t: int(str(t["taskid"]).rsplit(".", 1)[1]))
        return {"run_id": run_id, "cmd": cmd, "timeout": timeout, "replayed": True,
                "targets": [{"uuid": t["uuid"], "hostname": t.get("hostname") or "", "taskid": t["taskid"],
                             "status": t["status"]} for t in tasks]}

    def _send_open(self, session: Session, tasks: list[dict[str, Any]]) -> list[str]:
        """Send ``session`` its open tasks (or their cancels); the taskids sent as tasks."""
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
        return sent

    async def send_held(self, tasks: list[dict[str, Any]]) -> int:
        """Send pending tasks another master stored for agents held here (``uuid`` in each row),
        those this master claims (pending -> dispatched, so a cancel meanwhile or a redelivery
        elsewhere is not raced); how many went out. Rows of agents no longer here are left
        to whoever holds them now."""
        here = [t for t in tasks if t["uuid"] in self.table.sessions and not t["cancel_requested"]]
        if not here:
            return 0
        claimed = set(await self.db(self.db.store.claim_pending, [t["taskid"] for t in here]))
        sent: list[str] = []
        for t in here:
            session = self.table.sessions.get(t["uuid"])
            if t["taskid"] in claimed and session is not None:  # (a session gone meanwhile: redelivered)
                sent += self._send_open(session, [t])
        self.stats["dispatched"] += len(sent)
        return len(sent)

    def send_cancels(self, tasks: list[dict[str, Any]]) -> list[str]:
        """Send the cancels another master asked for, to agents held here; the taskids sent."""
        sent = []
        for t in tasks:
            session = self.table.sessions.get(t["uuid"])
            if session is not None:
                session.send([self.cancel_msg(t["uuid"], t["taskid"], t.get("cmd", ""))])
                sent.append(t["taskid"])
        return sent

    # -- runs ---------------------------------------------------------------------------------
    async def create_run(self, cmd: str, args: dict[str, Any], targets: Any, timeout: float,
                         run_id: str | None = None) -> dict[str, Any]:
        """``run_id``: one the caller chose and stored first (a release step), else a new one."""
        check_cmd(cmd)
        self._check_size(args)
        agents = await self.db(self.db.store.target_rows)
        try:
            chosen = resolve(targets, agents)
        except ValueError as exc:
            raise RequestRejected(str(exc), kind="target") from None
        run_id = run_id or new_run_id()
        deadline = time.time() + timeout + self.settings.result_grace
        sessions = self.table.sessions
        elsewhere = await self._elsewhere([a["uuid"] for a in chosen if a["uuid"] not in sessions])
        rows: list[tuple[str, str, TaskStatus, float]] = []
        for i, agent in enumerate(chosen):
            uuid = agent["uuid"]
            status = (TaskStatus.DISPATCHED if uuid in sessions else TaskStatus.PENDING if uuid in elsewhere
                      else TaskStatus.OFFLINE)
            rows.append((f"{run_id}.{i}", uuid, status, deadline))
        dispatched = await self._store_run(run_id, cmd, args, timeout, rows)
        if elsewhere and self.placement is not None:  # stored first: the holders read the store
            self.placement.wake_dispatch(set(elsewhere.values()), run_id)
        # Tasks are stored as dispatched before they are sent: if this session drops before the
        # agent sees them, the next handshake redelivers them.
        for taskid, uuid, status, _ in rows:
            session = sessions.get(uuid)
            if status == TaskStatus.DISPATCHED and taskid in dispatched and session:
                session.send([self.task_msg(uuid, taskid, cmd, args, timeout, deadline, run_id)])
                self.stats["dispatched"] += 1
        self.events.notify({run_id})
        stored = [r[2] if r[2] != TaskStatus.DISPATCHED or r[0] in dispatched else TaskStatus.PENDING for r in rows]
        return {
            "run_id": run_id, "cmd": cmd, "timeout": timeout,
            "targets": [{"uuid": a["uuid"], "hostname": a["hostname"], "taskid": r[0], "status": status}
                        for a, r, status in zip(chosen, rows, stored, strict=True)],
        }

    async def _store_run(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float,
                         rows: list[tuple[str, str, TaskStatus, float]]) -> set[str]:
        """Store the run; the taskids stored dispatched (this master's to send)."""
        if self.placement is None:
            await self.db(self.db.store.create_run, run_id, cmd, args, timeout, rows)
            return {r[0] for r in rows if r[2] == TaskStatus.DISPATCHED}
        # with several masters: dispatched only where this master's session is still the store's
        # (a handshake elsewhere meanwhile: stored pending, and its new holder sends it)
        epochs = {uuid: s.epoch for uuid in {r[1] for r in rows} if (s := self.table.sessions.get(uuid))}
        _, dispatched = await self.db(self.db.store.create_run_held, run_id, cmd, args, timeout, rows,
                                      (self.placement.master_id, epochs))
        return set(dispatched)

    async def _elsewhere(self, uuids: list[str]) -> dict[str, str]:
        if self.placement is None or not uuids:
            return {}
        return await self.placement.elsewhere(uuids)

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
        # pending tasks end "cancelled before the agent received it" in the same transaction
        # (a holder claims a pending task before it sends it: one or the other wins)
        open_tasks, changed = await self.db(self.db.store.cancel_pending, run_id)
        self.events.notify(changed)
        remote: list[str] = []
        for t in open_tasks:
            session = self.table.sessions.get(t["uuid"])
            if session:
                session.send([self.cancel_msg(t["uuid"], t["taskid"])])
            else:  # the agent may be running it; the cancel goes out from its holder, or at its reconnect
                remote.append(t["uuid"])
        holders = await self._elsewhere(remote)
        if holders and self.placement is not None:  # cancel_requested is stored: its holder sends it
            self.placement.wake_dispatch(set(holders.values()), run_id)
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
            verdicts += await self._gone_verdicts(uuid)
        await self._finish_overdue(verdicts)

    async def write_off_gone(self, uuids: list[str]) -> None:
        """With several masters (on the singleton holder): the open tasks of agents no master
        has held for the grace (``uuids``), and overdue tasks."""
        verdicts: list[tuple[str, str, str]] = []
        for uuid in uuids:
            verdicts += await self._gone_verdicts(uuid)
        if verdicts:  # only while nobody holds the agent: one claimed since is its master's to serve
            self.events.notify(await self.db(self.db.store.finish_unheld, verdicts))
        await self._finish_overdue([])

    async def _gone_verdicts(self, uuid: str) -> list[tuple[str, str, str]]:
        verdicts: list[tuple[str, str, str]] = []
        for t in await self.db(self.db.store.open_tasks_for, uuid):
            if t["status"] == TaskStatus.RUNNING:
                verdicts.append((t["taskid"], TaskStatus.ERROR, "agent went offline while the task ran"))
            else:
                verdicts.append((t["taskid"], TaskStatus.OFFLINE, "agent is offline"))
        return verdicts

    async def _finish_overdue(self, verdicts: list[tuple[str, str, str]]) -> None:
        for t in await self.db(self.db.store.overdue_tasks, time.time()):
            verdicts.append((t["taskid"], TaskStatus.ERROR, "no result from the agent within the timeout"))
        if verdicts:
            self.events.notify(await self.db(self.db.store.finish_by_master, verdicts))
