"""The master's live state, put together: the session table (``master.sessions``), dispatch of
runs and tasks (``master.dispatch``), the result writer (``master.ingest``), the schedules'
reconciliation (``master.schedules``) and the run wake-ups (``master.run_events``).

``Hub`` is only the composition and the face the channel server and the API call; each piece
is usable and testable on its own. The uplink's per-message calls (``touch``, ``carried``,
``authentic``, ``ingest``, ...) are the pieces' own bound methods, so the facade costs nothing
per message.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup

from hcsdk.protocol import vocab
from hcsdk.protocol.tasks import SessionKind

from .cluster import Cluster
from .dispatch import Dispatch, check_cmd
from .errors import RequestRejected
from .ingest import Ingest
from .run_events import RunEvents
from .schedules import Schedules
from .sessions import Session, Sessions, is_handover
from .settings import MasterSettings
from .store import AgentRecord, Coalesced, JoinTokenRecord, StoreThread

log = logging.getLogger("zy.master.hub")


class Hub:
    def __init__(self, db: StoreThread, settings: MasterSettings):
        self.db = db
        self.settings = settings
        #: counters shown by /api/v1/status; the channel server and the blob store add their own
        self.stats: dict[str, int] = {"ingested": 0, "dispatched": 0, "rejected": 0, "busy": 0}
        self.table = Sessions()
        self.events = RunEvents()
        #: every request's credential check, and each handshake's update of the agent's row:
        #: coalesced, so a reconnect storm costs a thread hop per batch, not per agent
        self._agent_rows = Coalesced(db, db.store.agent)
        self._connected = Coalesced(db, self._agent_connected)
        self.dispatch = Dispatch(db, settings, self.table, self.events, self.stats)
        self.results = Ingest(db, self.table, self.events, self.stats)
        self.schedules = Schedules(db, self.create_run)
        #: this master among the others sharing the store (alone on SQLite)
        self.cluster = Cluster(db, settings, self.table, self.events, self.dispatch)
        if self.cluster.shared:
            self.dispatch.placement = self.cluster
            self.schedules.shared = True
        #: the URLs this master is reached at: the server fills the list once it listens
        self.urls = self.cluster.urls
        #: started with the hub (releases pick up where a restart left them)
        self.on_start: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tg: TaskGroup | None = None
        self._next_retention = 0.0
        # the table's own dicts (never rebound): what is online, and old builds still reporting
        self.sessions = self.table.sessions
        self.retiring = self.table.retiring
        # the uplink's per-message calls, bound straight to the piece that does the work
        self.authentic = self.table.authentic
        self.carried = self.table.carried
        self.touch = self.table.touch
        self.session_ended = self.table.session_ended
        self.ingest = self.results.put
        self.refuse_sample = self.results.refuse_sample
        self.may_sample = self.schedules.may_sample
        self.cancel_run = self.dispatch.cancel_run
        self.notify = self.events.notify
        self.run_changed = self.events.changed
        self.forget_run_waiter = self.events.forget
        self.schedules_given = self.schedules.given
        self.reconcile_schedules = self.schedules.reconcile

    @property
    def task_group(self) -> TaskGroup | None:
        """Where background work of the master's runs (releases), once ``run`` started."""
        return self._tg

    @property
    def schedule_specs(self) -> list[dict[str, Any]] | None:
        """The schedules cached for handshakes; the API sets None when it changes them."""
        return self.schedules.specs

    @schedule_specs.setter
    def schedule_specs(self, specs: list[dict[str, Any]] | None) -> None:
        self.schedules.specs = specs

    @property
    def singleton_group(self) -> TaskGroup | None:
        """Where singleton work runs in the background (release drivers): the master's own task
        group alone on SQLite; with several masters, one that exists only while this master holds
        the singleton lease (and is cancelled when it loses it)."""
        return self.cluster.singleton_group if self.cluster.shared else self._tg

    async def run(self, tg: TaskGroup) -> None:
        if not self.cluster.shared:
            # After a master restart, agents come back over their reconnect backoff: give them
            # that long before their open tasks are written off. (With several masters the
            # singleton judges from the store's sessions instead: master.cluster.)
            since = time.monotonic() + max(0.0, self.settings.startup_grace - self.settings.offline_grace)
            self.table.presume_offline(await self.db(self.db.store.open_task_agents), since)
        self._tg = tg
        await self.cluster.prepare()
        tg.start_soon(self.cluster.run)
        for hook in self.on_start:
            tg.start_soon(hook)
        tg.start_soon(self.results.run)
        tg.start_soon(self._sweep_loop)

    async def leave(self) -> None:
        """At a clean shutdown, after ``begin_shutdown``: let the other masters take over now."""
        await self.cluster.leave()

    async def online_uuids(self, uuids: list[str]) -> set[str]:
        """Which of ``uuids`` are connected, to this master or (sharing a store) another."""
        return await self.cluster.online(uuids)

    async def handshake(self, uuid: str, facts: dict[str, Any], labels: dict[str, str], mode: str,
                        key: bytes, kind: str = SessionKind.AGENT, carrier: Session | None = None,
                        via: list[str] | None = None, handover: str | None = None,
                        schedules: dict[str, str] | None = None) -> Session:
        self.table.set_key(uuid, key)
        old = self.sessions.get(uuid)
        handing_over = handover if old and handover and await is_handover(self.db, uuid, handover) else None
        session = Session(uuid=uuid, sid=secrets.token_hex(8), hostname=str(facts.get("hostname", "")), mode=mode,
                          kind=kind, carrier=carrier, via=list(via or []))
        await self.cluster.claim(uuid, session)  # (before the table: the epoch is the session's)
        self.table.open(session, old, handing_over)
        await self._connected((uuid, facts, labels))
        await self.dispatch.redeliver(session)
        if schedules is not None and self._tg is not None and self.schedules.worth_reconciling(schedules):
            self._tg.start_soon(self.schedules.reconcile, uuid, schedules)
        return session

    async def create_run(self, cmd: str, args: dict[str, Any], targets: Any, timeout: float,
                         run_id: str | None = None) -> dict[str, Any]:
        run = await self.dispatch.create_run(cmd, args, targets, timeout, run_id)
        self._gave(cmd, args, run)
        return run

    async def create_run_once(self, cmd: str, args: dict[str, Any], targets: Any, timeout: float,
                              run_id: str) -> dict[str, Any]:
        """A run a client named: created once, whichever master each try of the request reached
        and however many tries there were; a try after the first gets the first one's answer."""
        replayed = await self.dispatch.replay(run_id, cmd, args, timeout)
        if replayed is not None:
            return replayed
        try:
            return await self.create_run(cmd, args, targets, timeout, run_id)
        except RequestRejected:
            raise
        except Exception:  # (another try stored it meanwhile, on another master: its key is taken)
            replayed = await self.dispatch.replay(run_id, cmd, args, timeout)
            if replayed is None:
                raise
            return replayed

    def _gave(self, cmd: str, args: dict[str, Any], run: dict[str, Any]) -> None:
        if cmd == vocab.SCHEDULE_SET:
            # (no await since the tasks went out: no sample of theirs can be judged before this)
            self.schedules.gave(str(args.get("name")), [t["uuid"] for t in run["targets"]])

    # -- the store, for the channel routes ---------------------------------------------------
    async def agent(self, uuid: str) -> AgentRecord | None:
        """The enrolled agent's (or proxy's) row, as stored."""
        return await self._agent_rows(uuid)

    def _agent_connected(self, call: tuple[str, dict[str, Any], dict[str, str]]) -> None:
        self.db.store.agent_connected(*call)

    async def join_token(self, token_id: str) -> JoinTokenRecord | None:
        return await self.db(self.db.store.join_token, token_id)

    async def enroll(self, uuid: str, credential_hash: str, token_id: str, facts: dict[str, Any],
                     labels: dict[str, str], e2e_key: bytes, kind: str) -> list[str]:
        """Record an enrollment (raises ``TokenUsedUp``): see ``Store.enroll``."""
        return await self.db(self.db.store.enroll, uuid, credential_hash, token_id, facts, labels, e2e_key, kind)

    # -- housekeeping -------------------------------------------------------------------------
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
        self.table.close_all("master shutting down")

    async def sweep(self) -> None:
        if self.table.stopping:
            return
        now = time.monotonic()
        self.table.end_silent(now, self.settings.dead_after, self.settings.idle_beat)
        if now >= self._next_retention and self.cluster.is_singleton:
            self._next_retention = now + 3600
            cutoff = time.time() - self.settings.sample_retention_days * 86400
            await self.db(self.db.store.forget_samples, cutoff)
        seen = self.table.take_seen()
        if seen:
            await self.db(self.db.store.touch_agents, seen)
        if self.cluster.shared:
            # an agent that left this master may be on another: only the singleton, which sees
            # every master's sessions in the store, writes off tasks (master.cluster)
            self.table.offline_since.clear()
        else:
            await self.dispatch.write_off(now)


__all__ = ["Hub", "RequestRejected", "Session", "check_cmd"]
