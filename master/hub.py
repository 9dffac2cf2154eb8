"""The master's live state: agent sessions, task dispatch, result ingest, run notifications.

Results flow: uplink handlers put agent messages on one ingest queue; a single writer drains
whatever is ready, stores it in one transaction, then acknowledges to each agent and wakes the
SDK streams of the runs that changed. Batching is what keeps SQLite and Python off the hot path.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup

from hcsdk.net.mailbox import Mailbox
from hcsdk.protocol.e2e import sign, verify
from hcsdk.protocol.wire import dumps

from .db import Db
from .schedule_spec import schedule_args
from .settings import MasterSettings
from .store import FINAL, schedules_given
from .targets import resolve, selects

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
log = logging.getLogger("zy.master.hub")


class Session(Mailbox):
    """One connected agent or proxy. Its outbox is volatile: anything lost with it is
    redelivered from the store on the agent's next handshake.

    An agent behind proxies has a ``carrier``: the session of the proxy connected to this
    master that relays for it; what is sent to the agent goes into the carrier's outbox, routed
    by uuid. ``via`` lists the proxies on the path, nearest the master first."""

    def __init__(self, uuid: str, sid: str, hostname: str, mode: str, kind: str = "agent",
                 carrier: Session | None = None, via: list[str] | None = None) -> None:
        super().__init__(uuid)
        self.sid = sid
        self.hostname = hostname
        self.mode = mode
        self.kind = kind
        self.carrier = carrier
        self.via = list(via or [])
        self.children: set[str] = set()
        self.last_rx = time.monotonic()

    def send(self, msgs: list[dict[str, Any]]) -> None:
        if self.carrier is not None:
            self.carrier.send(msgs)
        else:
            super().send(msgs)


class RequestRejected(ValueError):
    """A request from the SDK that cannot be carried out; ``kind`` names the cause."""

    def __init__(self, message: str, kind: str = "request", status: int = 422):
        super().__init__(message)
        self.kind = kind
        self.status = status


class Hub:
    def __init__(self, db: Db, settings: MasterSettings):
        self.db = db
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        #: old builds of agents that are handing over to a new one: their uplink stays open
        self.retiring: dict[str, Session] = {}
        self.offline_since: dict[str, float] = {}
        self._run_events: dict[str, anyio.Event] = {}
        self._ingest_tx, self._ingest_rx = anyio.create_memory_object_stream[tuple[str, dict[str, Any]]](20_000)
        self._seen: dict[str, float] = {}
        self.stats = {"ingested": 0, "dispatched": 0, "rejected": 0, "busy": 0}
        self.keys: dict[str, bytes] = {}
        self.stopping = False
        self._tg: TaskGroup | None = None
        self._next_retention = 0.0
        #: started with the hub (releases pick up where a restart left them)
        self.on_start: list[Callable[[], Coroutine[Any, Any, None]]] = []
        #: the schedules, cached for handshakes; None when they must be read again
        self.schedule_specs: list[dict[str, Any]] | None = None
        #: uuid -> names of the schedules the master ever sent it (read from the store once per
        #: agent, kept up to date as schedules are set): what it may sample into and report
        self._given: dict[str, set[str]] = {}
        self._given_loaded: set[str] = set()

    async def run(self, tg: TaskGroup) -> None:
        # After a master restart, agents come back over their reconnect backoff: give them
        # that long before their open tasks are written off.
        since = time.monotonic() + max(0.0, self.settings.startup_grace - self.settings.offline_grace)
        for uuid in await self.db(self.db.store.open_task_agents):
            self.offline_since.setdefault(uuid, since)
        self._tg = tg
        for hook in self.on_start:
            tg.start_soon(hook)
        tg.start_soon(self._ingest_loop)
        tg.start_soon(self._sweep_loop)

    # -- sessions ---------------------------------------------------------------------------
    def authentic(self, msg: dict[str, Any]) -> bool:
        key = self.keys.get(str(msg.get("uuid")))
        return key is not None and verify(key, msg)

    def _signed(self, msg: dict[str, Any]) -> dict[str, Any]:
        return sign(self.keys[msg["uuid"]], msg)

    async def handshake(self, uuid: str, facts: dict[str, Any], labels: dict[str, str], mode: str,
                        key: bytes, kind: str = "agent", carrier: Session | None = None,
                        via: list[str] | None = None, handover: str | None = None,
                        schedules: dict[str, str] | None = None) -> Session:
        self.keys[uuid] = key
        old = self.sessions.get(uuid)
        if old and handover and await self._updating(uuid, handover):
            # step 4 of an online update: new commands go to the new agent from now on, while the
            # old one keeps its channel to report what it still runs
            self.retiring[uuid] = old
            log.info("agent %s hands over to its new build (update task %s)", uuid, handover)
        elif old:
            self.session_ended(old, reason="superseded by a new handshake", offline=False)
        session = Session(uuid=uuid, sid=secrets.token_hex(8), hostname=str(facts.get("hostname", "")), mode=mode,
                          kind=kind, carrier=carrier, via=list(via or []))
        if carrier is not None:
            carrier.children.add(uuid)
        self.sessions[uuid] = session
        self.offline_since.pop(uuid, None)
        await self.db(self.db.store.agent_connected, uuid, facts, labels)
        await self._redeliver(session)
        if schedules is not None and self._tg is not None and (schedules or self.schedule_specs != []):
            # (a reconnect storm of agents with no schedules, on a master with none, costs nothing)
            self._tg.start_soon(self.reconcile_schedules, uuid, schedules)
        return session

    async def reconcile_schedules(self, uuid: str, reported: dict[str, str]) -> None:
        """Bring an agent's schedules (``reported``: name -> digest) in line with the master's:
        one that was offline when a schedule was set, or that joined later with matching labels,
        gets it; one whose schedule was cancelled meanwhile loses it."""
        try:
            if self.schedule_specs is None:
                self.schedule_specs = await self.db(self.db.store.schedule_specs)
            specs = self.schedule_specs
            if not specs and not reported:
                return
            agent = await self.db(self.db.store.target_row, uuid)
            wanted = {s["name"]: s for s in specs if agent is not None and selects(s["targets"], agent)}
            for name, spec in wanted.items():
                args = schedule_args(name, spec["cmd"], spec["args"], spec["every"], spec["timeout"])
                if reported.get(name) != args["digest"]:
                    await self.create_run("zy.schedule.set", args, {"uuids": [uuid]}, 60.0)
            # only what the master once gave this agent: a handshake naming others (invented,
            # or another agent's) makes no cancel run
            given = await self.schedules_given(uuid)
            for name in sorted((set(reported) - set(wanted)) & given):
                await self.create_run("zy.schedule.cancel", {"name": name}, {"uuids": [uuid]}, 60.0)
        except Exception:  # the next handshake tries again
            log.exception("could not reconcile the schedules of %s", uuid)

    async def schedules_given(self, uuid: str) -> set[str]:
        """Names of the schedules the master ever sent agent ``uuid``."""
        if uuid not in self._given_loaded:
            loaded = await self.db(schedules_given, self.db.store, uuid)
            # a union, not an assignment: a schedule set while the store was being read is kept
            self._given.setdefault(uuid, set()).update(loaded)
            self._given_loaded.add(uuid)
        return self._given[uuid]

    async def may_sample(self, uuid: str, msg: dict[str, Any]) -> bool:
        """Whether a sample from ``uuid`` belongs to a schedule the master gave it: any other is
        an agent writing into a series that is not its own."""
        series = msg["p"]["series"]
        return msg.get("taskid", "").startswith(f"sample:{series}:") and series in await self.schedules_given(uuid)

    def refuse_sample(self, session: Session, uuid: str, msg: dict[str, Any]) -> None:
        """Not stored, counted, and acknowledged: the agent stops resending what will never be
        taken (as the store does for results of tasks that are not the sender's)."""
        self.stats["rejected"] += 1
        log.warning("rejected a sample from %s for series %r: the master never gave it that schedule",
                    uuid, msg["p"]["series"])
        session.send([self._signed({"t": "ack", "uuid": uuid, "cmd": "", "taskid": "", "seq": 0,
                                    "p": {"ids": [[msg["taskid"], msg["seq"]]]}})])

    async def _updating(self, uuid: str, taskid: str) -> bool:
        """Whether ``taskid`` is an open update of agent ``uuid`` (so a handshake naming it is the
        new build taking over, not a restart)."""
        task = await self.db(self.db.store.task, taskid)
        return bool(task and task["uuid"] == uuid and task["cmd"] == "zy.update" and task["status"] not in FINAL)

    def session_ended(self, session: Session, reason: str = "channel ended", offline: bool = True) -> None:
        """A session is over; so is every session a proxy session was carrying."""
        if self.retiring.get(session.uuid) is session:
            del self.retiring[session.uuid]
            session.close(reason)
            log.info("agent %s: the old build's channel closed (%s)", session.uuid, reason)
            return
        session.close(reason)
        for old in [r for r in self.retiring.values() if r.carrier is session]:
            self.session_ended(old, reason=f"its proxy {session.hostname or session.uuid} went away")
        if session.carrier is not None:
            session.carrier.children.discard(session.uuid)
        for child_uuid in list(session.children):
            child = self.sessions.get(child_uuid)
            if child is not None and child.carrier is session:
                self.session_ended(child, reason=f"its proxy {session.hostname or session.uuid} went away")
        session.children.clear()
        if self.sessions.get(session.uuid) is session:
            del self.sessions[session.uuid]
            back = self.retiring.pop(session.uuid, None)
            if back is not None and not back.closed.is_set():
                # a new build that died while the old one was still handing over: the old one
                # is the agent again (it reconnects as such once it notices)
                self.sessions[session.uuid] = back
                log.warning("agent %s: the new build went away during its update; the old one carries on",
                            session.uuid)
            elif offline and not self.stopping:
                self.offline_since[session.uuid] = time.monotonic()

    def carried(self, carrier: Session, uuid: str) -> Session | None:
        """The session of ``uuid`` if ``carrier`` is the connection that relays for it."""
        session = self.sessions.get(uuid)
        if session is not None and (session is carrier or session.carrier is carrier):
            return session
        # the old build of an updating agent, direct or behind a proxy (maybe another one than
        # the new build's)
        retiring = self.retiring.get(uuid)
        if retiring is not None and (retiring is carrier or retiring.carrier is carrier):
            return retiring
        return None

    def touch(self, session: Session) -> None:
        session.last_rx = time.monotonic()
        self._seen[session.uuid] = time.time()

    async def _redeliver(self, session: Session) -> None:
        tasks = await self.db(self.db.store.open_tasks_for, session.uuid)
        msgs, sent = [], []
        for t in tasks:
            if t["cancel_requested"]:
                msgs.append(self._signed({"t": "cancel", "uuid": session.uuid, "cmd": t["cmd"], "taskid": t["taskid"],
                                          "seq": 0}))
            elif t["status"] in ("pending", "dispatched"):
                msgs.append(self._task_msg(session.uuid, t["taskid"], t["cmd"], _loads(t["args"]), t["timeout"],
                                           t["deadline"]))
                sent.append(t["taskid"])
        if msgs:
            session.send(msgs)
            await self.db(self.db.store.mark_dispatched, sent)

    def _task_msg(self, uuid: str, taskid: str, cmd: str, args: dict[str, Any], timeout: float,
                  deadline: float) -> dict[str, Any]:
        # exp and aud make a captured command useless later or for another agent; the MAC
        # makes it impossible to alter or forge on the way
        return self._signed({"t": "task", "uuid": uuid, "cmd": cmd, "taskid": taskid, "seq": 0,
                             "p": {"args": args, "timeout": timeout, "exp": deadline, "aud": uuid}})

    # -- runs -------------------------------------------------------------------------------
    async def create_run(self, cmd: str, args: dict[str, Any], targets: Any, timeout: float) -> dict[str, Any]:
        check_cmd(cmd)
        try:
            size = len(dumps(args))
        except (TypeError, ValueError) as exc:
            raise RequestRejected(f"the command's arguments cannot be encoded: {exc}") from None
        if size > self.settings.max_frame - 1024:
            raise RequestRejected(f"the command's arguments take {size} bytes; at most "
                                  f"{self.settings.max_frame - 1024} fit in one message", status=413)
        agents = await self.db(self.db.store.target_rows)
        try:
            chosen = resolve(targets, agents)
        except ValueError as exc:
            raise RequestRejected(str(exc), kind="target") from None
        run_id = "r" + secrets.token_hex(6)
        now = time.time()
        deadline = now + timeout + self.settings.result_grace
        rows = []
        for i, agent in enumerate(chosen):
            online = agent["uuid"] in self.sessions
            rows.append((f"{run_id}.{i}", agent["uuid"], "dispatched" if online else "offline", deadline))
        await self.db(self.db.store.create_run, run_id, cmd, args, timeout, rows)
        if cmd == "zy.schedule.set":
            for _, uuid, _, _ in rows:
                self._given.setdefault(uuid, set()).add(str(args.get("name")))
        # Tasks are stored as dispatched before they are sent: if this session drops before the
        # agent sees them, the next handshake redelivers them.
        for taskid, uuid, status, _ in rows:
            session = self.sessions.get(uuid)
            if status == "dispatched" and session:
                session.send([self._task_msg(uuid, taskid, cmd, args, timeout, deadline)])
                self.stats["dispatched"] += 1
        self.notify({run_id})
        return {
            "run_id": run_id, "cmd": cmd, "timeout": timeout,
            "targets": [{"uuid": a["uuid"], "hostname": a["hostname"], "taskid": r[0], "status": r[2]}
                        for a, r in zip(chosen, rows, strict=True)],
        }

    async def cancel_run(self, run_id: str) -> int:
        if not await self.db(self.db.store.run_exists, run_id):
            raise RequestRejected(f"no run {run_id!r}", kind="run", status=404)
        open_tasks = await self.db(self.db.store.request_cancel, run_id)
        unreachable = []
        for t in open_tasks:
            session = self.sessions.get(t["uuid"])
            if t["status"] == "pending":
                unreachable.append((t["taskid"], "cancelled", "cancelled before the agent received it"))
            elif session:
                session.send([self._signed({"t": "cancel", "uuid": t["uuid"], "cmd": "", "taskid": t["taskid"],
                                            "seq": 0})])
            # else: the agent may be running it; the cancel goes out when it reconnects
        if unreachable:
            self.notify(await self.db(self.db.store.finish_by_master, unreachable))
        return len(open_tasks)

    def notify(self, run_ids: set[str]) -> None:
        for run_id in run_ids:
            ev = self._run_events.pop(run_id, None)
            if ev:
                ev.set()

    def run_changed(self, run_id: str) -> anyio.Event:
        return self._run_events.setdefault(run_id, anyio.Event())

    def forget_run_waiter(self, run_id: str) -> None:
        ev = self._run_events.get(run_id)
        if ev is not None and not ev.is_set():
            del self._run_events[run_id]

    # -- ingest -----------------------------------------------------------------------------
    async def ingest(self, uuid: str, msg: dict[str, Any]) -> None:
        await self._ingest_tx.send((uuid, msg))

    async def _ingest_loop(self) -> None:
        async for first in self._ingest_rx:
            batch = [first]
            while len(batch) < 5000:
                try:
                    batch.append(self._ingest_rx.receive_nowait())
                except anyio.WouldBlock:
                    break
            try:
                acks, changed = await self.db(self.db.store.ingest, batch)
            except Exception:
                # e.g. a full disk: nothing is acknowledged, and the senders' channels are closed
                # so that they reconnect and resend everything still in their spools
                log.exception("could not store %d agent messages; their agents will resend", len(batch))
                for uuid in {u for u, _ in batch}:
                    session = self.sessions.get(uuid)
                    if session:
                        session.close("results could not be stored")
                        self.session_ended(session)
                continue
            self.stats["ingested"] += len(batch)
            for uuid, pairs in acks.items():
                session = self.sessions.get(uuid)
                if session:
                    session.send([self._signed({"t": "ack", "uuid": uuid, "cmd": "", "taskid": "", "seq": 0,
                                                "p": {"ids": pairs}})])
            self.notify(changed)

    # -- housekeeping -----------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(1.0)
            try:
                await self.sweep()
            except Exception:  # housekeeping must never take the master down
                log.exception("sweep failed; trying again in a second")

    def begin_shutdown(self) -> None:
        """Close every channel (agents reconnect to the next master) and stop judging tasks:
        a master that is going away must not write off tasks whose agents only lost it."""
        self.stopping = True
        for session in list(self.sessions.values()):
            session.close("master shutting down")

    async def sweep(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for session in [*self.sessions.values(), *self.retiring.values()]:
            # an HTTP/2 channel's liveness is the connection's PINGs (granian closes it when
            # they go unanswered); its application heartbeats only show it is not wedged
            limit = self.settings.dead_after
            if session.mode == "h2":
                limit = max(limit, 2.5 * self.settings.idle_beat)
            if session.carrier is None and now - session.last_rx > limit:
                session.close(f"no traffic for {limit:.0f}s")
                self.session_ended(session)
        if now >= self._next_retention:
            self._next_retention = now + 3600
            cutoff = time.time() - self.settings.sample_retention_days * 86400
            await self.db(self.db.store.forget_samples, cutoff)
        if self._seen:
            seen, self._seen = self._seen, {}
            await self.db(self.db.store.touch_agents, seen)
        verdicts: list[tuple[str, str, str]] = []
        for uuid, since in list(self.offline_since.items()):
            # the awaits below let handshakes run: an agent may have come back meanwhile
            if now - since < self.settings.offline_grace or self.offline_since.get(uuid) != since:
                continue
            del self.offline_since[uuid]
            for t in await self.db(self.db.store.open_tasks_for, uuid):
                if t["status"] == "running":
                    verdicts.append((t["taskid"], "error", "agent went offline while the task ran"))
                else:
                    verdicts.append((t["taskid"], "offline", "agent is offline"))
        for t in await self.db(self.db.store.overdue_tasks, time.time()):
            verdicts.append((t["taskid"], "error", "no result from the agent within the timeout"))
        if verdicts:
            self.notify(await self.db(self.db.store.finish_by_master, verdicts))


def _loads(text: str) -> Any:
    from hcsdk.protocol.wire import loads

    return loads(text)


__all__ = ["FINAL", "KNOWN_CMDS", "SYSTEM_CMDS", "Hub", "RequestRejected", "Session", "check_cmd"]
