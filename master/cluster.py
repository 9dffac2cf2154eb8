"""This master as one of several sharing a store (issue 15).

``Cluster`` registers the master in the store's registry and heartbeats (with the number of
agents it holds), keeps the lease ``singleton`` while it can (``is_singleton``: the cluster's
one-at-a-time work runs only here then), listens for wake-ups and sweeps:

- its wake-up channel ``zy_m_<id>``: ``d:<run_id>`` (another master stored tasks, or cancels,
  for agents held here) and ``s:<uuid>:<epoch>`` (a handshake elsewhere took that agent);
- ``zy_runs``: run ids whose events changed on some master (SDK streams here read again);
- the dispatch sweep, every ``dispatch_sweep``, repairs what lost wake-ups leave: pending tasks
  of agents held here go out, sessions the store says are superseded close, ended sessions are
  dropped from the store;
- as singleton: the sessions of dead masters are dropped and the masters forgotten; the open
  tasks of agents no master holds are written off after the grace.

On SQLite (one master) the registry and the lease are kept too (``zy master cluster`` shows
them), but nothing is shared: no session claims, no wake-ups; the master is always singleton.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from hcsdk.net.serve import StartupError

from .dispatch import Dispatch
from .run_events import RunEvents
from .sessions import Session, Sessions
from .settings import MasterSettings
from .store import Coalesced, StoreThread

if TYPE_CHECKING:
    from .store.wakeups import Wakeups

__all__ = ["RUNS_CHANNEL", "SINGLETON", "Cluster", "master_channel"]

log = logging.getLogger("zy.master.cluster")

#: the lease whose holder runs the singleton work
SINGLETON = "singleton"
#: run ids whose events changed, for every master's SDK streams
RUNS_CHANNEL = "zy_runs"
#: how often waiting SDK streams read the store again without a wake-up (lost ones)
_REREAD = 1.0
#: every how many dispatch sweeps the store's epochs of every local session are compared (a
#: read of all of them: 10,000 rows on a big master)
_SUPERSEDED_EVERY = 3


def master_channel(master_id: str) -> str:
    """The wake-up channel of one master (a PostgreSQL identifier: lower case; the same name
    as ``master.store.wakeups.master_channel``, without importing psycopg on SQLite)."""
    return "zy_m_" + master_id.lower().replace("-", "_")


SingletonWork = Callable[[], Awaitable[None]]
#: how many heartbeats a master starting with the id of a registered one waits for that one to
#: beat: none (a run that crashed without leaving) -> taken over; one -> another process of the
#: id is alive (a copied data dir) -> refused
_TWIN_BEATS = 3


def twin_message(master_id: str, age: float) -> str:
    return (f"another master with id {master_id} is alive (heartbeat {age:.0f}s ago) — a copied data dir? "
            "remove DATA_DIR/master.id on the copy")


def _stop_process(message: str) -> None:
    """A master that found its id taken by another live process stops as at a SIGTERM (its
    shutdown leaves the store alone: ``Cluster.leave`` knows)."""
    os.kill(os.getpid(), signal.SIGTERM)


class Cluster:
    def __init__(self, db: StoreThread, settings: MasterSettings, table: Sessions, events: RunEvents,
                 dispatch: Dispatch) -> None:
        self.db = db
        self.store = db.store
        self.settings = settings
        self.table = table
        self.events = events
        self.dispatch = dispatch
        if not settings.master_id:
            settings.master_id = "m-" + secrets.token_hex(4)
            log.warning("no master id was given; this run is %s (the server keeps one in DATA_DIR/master.id)",
                        settings.master_id)
        self.master_id = settings.master_id
        #: handshakes' session claims, coalesced (master/store/offload.py says why)
        self._claims = Coalesced(db, self._claim)
        #: this process among those that might run ``master_id`` (a copied data dir): a token
        #: kept with the registry's row, checked by every heartbeat and lease renewal
        self.instance = secrets.token_hex(8)
        #: why this master stopped taking part (another live process has its id), or None
        self.twin: str | None = None
        #: what it does then: the process stops (tests replace it)
        self.on_twin: Callable[[str], None] = _stop_process
        #: several masters share the store: sessions are claimed, wake-ups sent
        self.shared = settings.store_url is not None
        #: the URLs this master is reached at (the server fills the list once it listens)
        self.urls: list[str] = []
        #: called at every sweep while this master holds the singleton lease
        self.singleton_work: list[SingletonWork] = []
        #: where singleton work started in the background runs: cancelled when the lease is lost
        self.singleton_group: TaskGroup | None = None
        self._singleton_until = float("inf") if not self.shared else 0.0
        self._live: dict[str, float] = {}  # master id -> its last heartbeat (this process's monotonic clock)
        self._kick = anyio.Event()
        self._cancels_sent: set[str] = set()
        self._gone: dict[str, float] = {}  # uuid -> since when no master holds it (monotonic)
        self._gone_grace_from = 0.0
        self._wakeups: Wakeups | None = None
        self._left = False
        self._sweeps = 0
        if self.shared:
            table.track_ended = True
            events.publish = True
        #: the heartbeat of a previous run of this id that did not move while this one looked
        #: (``prepare`` takes that row over only if it still did not)
        self._stale_beat = self._refuse_a_live_twin() if self.shared else None

    # -- what the others ask ------------------------------------------------------------------
    @property
    def is_singleton(self) -> bool:
        """Whether this master holds the lease ``singleton`` now (always, alone on SQLite)."""
        return time.monotonic() < self._singleton_until

    async def elsewhere(self, uuids: list[str]) -> dict[str, str]:
        """uuid -> the live master other than this one that holds it (``Placement``)."""
        if not self.shared or not uuids:
            return {}
        holders = await self.db(self.store.session_holders, uuids)
        if any(m not in self._live for m, _ in holders.values()):
            await self._refresh_masters()  # a master that started since the last heartbeat
        return {u: m for u, (m, _) in holders.items() if m != self.master_id and self._is_live(m)}

    async def online(self, uuids: list[str]) -> set[str]:
        """Which of ``uuids`` some live master holds (this one included)."""
        here = {u for u in uuids if u in self.table.sessions}
        rest = [u for u in uuids if u not in here]
        return here | set(await self.elsewhere(rest))

    def wake_dispatch(self, master_ids: set[str], run_id: str) -> None:
        """``Placement``: one ``d:<run_id>`` per master (sent in the background)."""
        for master_id in master_ids - {self.master_id}:
            self._send_soon(master_channel(master_id), [f"d:{run_id}"])

    async def claim(self, uuid: str, session: Session) -> None:
        """A handshake here: the store's session of ``uuid`` is this master's from now
        (``session.epoch``); the master that held it before is told to close its own."""
        if not self.shared:
            return
        previous, session.epoch = await self._claims(uuid)
        if previous is not None and previous != self.master_id:
            self._send_soon(master_channel(previous), [f"s:{uuid}:{session.epoch}"])

    def _claim(self, uuid: str) -> tuple[str | None, int]:
        """(the master that held ``uuid`` before, or None; the new epoch)."""
        before = self.store.session_holders([uuid]).get(uuid)
        return (before[0] if before else None), self.store.claim_session(uuid, self.master_id, time.time())

    # -- the loops ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Everything above, until cancelled."""
        await self._register()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._sweep_loop)
            tg.start_soon(self._singleton_tenures)
            if self.shared:
                from .store.wakeups import open_wakeups

                self._wakeups = wakeups = open_wakeups(self.settings.store_url, on_reconnect=self._reconnected,
                                                       application_name=f"zy-wakeups-{self.master_id}")
                wakeups.subscribe(master_channel(self.master_id), self._on_wakeup)
                wakeups.subscribe(RUNS_CHANNEL, self.events.wake)
                tg.start_soon(wakeups.run)
                tg.start_soon(self._publish_loop)
                tg.start_soon(self._reread_loop)

    async def leave(self) -> None:
        """A clean shutdown: out of the registry, the lease and the sessions let go, so another
        master takes over at once instead of after ``master_dead_after``."""
        if self._left:
            return  # (a master whose id another process took leaves that one's records alone)
        self._left = True
        self._singleton_until = 0.0

        def leave() -> None:
            if self.shared:
                self.store.drop_sessions_of(self.master_id)
            self.store.release_lease(SINGLETON, self.master_id)
            self.store.forget_master(self.master_id)

        try:
            with anyio.fail_after(5):
                await self.db(leave)
        except Exception:  # the others find out after master_dead_after instead
            log.exception("could not leave the cluster cleanly")

    async def _register(self, again: bool = False) -> bool:
        """Into the registry with this master's URLs; False (and this master stops) when
        another live process holds the id."""
        with anyio.move_on_after(5):  # the server fills in its URLs once it listens
            while not self.urls:  # noqa: ASYNC110 - the server appends to this list
                await anyio.sleep(0.02)
        if self.shared:
            if not await self.db(self.store.join_master, self.master_id, self.instance, list(self.urls), time.time(),
                                 self.settings.master_dead_after):
                await self._lost_to_twin()
                return False
        else:  # (alone on its data dir, which lock_dir keeps to one process)
            await self.db(self.store.register_master, self.master_id, list(self.urls), time.time(), self.instance)
        log.info("master %s %s the cluster with %s", self.master_id, "joined again" if again else "joined", self.urls)
        return True

    def _refuse_a_live_twin(self) -> float | None:
        """At construction, before the server's task group (so that ``StartupError`` reaches the
        CLI as itself: exit 2), blocking: whether another process of this id is alive (a copied
        data dir or a restored backup of DATA_DIR). A fresh row is watched for a few of its
        beats: one -> ``StartupError``; none -> a run that crashed without leaving, whose
        ``heartbeat_at`` is returned for ``prepare`` to take the row over from."""
        other = self.store.master_instance(self.master_id)
        if other is None or other[2] >= self.settings.master_dead_after:
            return None
        log.info("master %s: another process of this id beat %.1fs ago; waiting to see whether it is alive",
                 self.master_id, other[2])
        time.sleep(_TWIN_BEATS * self.settings.cluster_heartbeat)  # (nothing else runs yet)
        again = self.store.master_instance(self.master_id)
        if again is None:
            return None
        if again[1] != other[1]:
            raise StartupError(twin_message(self.master_id, again[2]))
        return other[1]

    async def _join(self) -> None:
        """Take this master's id in the registry before anything else, unless another process of
        it is alive: ``StartupError`` (the check at construction found none: this is the race of
        one starting meanwhile). A row whose heartbeat is fresh but does not move for a few
        beats is a run that crashed without leaving: taken over."""
        seen = self._stale_beat
        for _ in range(_TWIN_BEATS):
            if await self.db(self.store.join_master, self.master_id, self.instance, list(self.urls), time.time(),
                             self.settings.master_dead_after, seen):
                if seen is not None:
                    log.warning("master %s: its previous run stopped without leaving the cluster; taking over",
                                self.master_id)
                return
            other = await self.db(self.store.master_instance, self.master_id)
            if other is None:
                continue  # it left meanwhile: join again
            if seen is not None and other[1] != seen:
                raise StartupError(twin_message(self.master_id, other[2]))
            seen = other[1]
            log.info("master %s: another process of this id beat %.1fs ago; waiting to see whether it is alive",
                     self.master_id, other[2])
            await anyio.sleep(_TWIN_BEATS * self.settings.cluster_heartbeat)
        other = await self.db(self.store.master_instance, self.master_id)
        raise StartupError(twin_message(self.master_id, other[2] if other else 0.0))

    async def _lost_to_twin(self) -> None:
        """Another live process runs this master's id (a copy of its data dir started while this
        one seemed dead): this one, the stale twin, stops without touching the store's records."""
        other = await self.db(self.store.master_instance, self.master_id)
        self.twin = twin_message(self.master_id, other[2] if other else 0.0)
        self._left = True
        self._singleton_until = 0.0
        log.error("master %s stops: %s", self.master_id, self.twin)
        self.on_twin(self.twin)

    async def prepare(self) -> None:
        """Before the master takes handshakes: a restarted master (same id) holds nothing yet,
        so the sessions its previous run left in the store are let go of (they would keep those
        agents looking online, and their tasks open, for ever)."""
        if self.shared:
            await self._join()  # (refuses to start beside a live twin, whose sessions these are)
            stale = await self.db(self.store.drop_sessions_of, self.master_id)
            if stale:
                log.info("master %s let go of %d sessions of its previous run", self.master_id, len(stale))

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._beat()
            except Exception:  # a store that is away (restarting): the next beat tries again
                log.exception("cluster heartbeat failed")
            await anyio.sleep(self.settings.cluster_heartbeat)

    async def _beat(self) -> None:
        if self._left:
            return
        now = time.time()
        started = time.monotonic()
        instance = self.instance if self.shared else None
        if not await self.db(self.store.master_heartbeat, self.master_id, len(self.table.sessions), now, instance):
            # the others took this master for dead (a long store outage): join again, and claim
            # again every session still held here; unless another process took the id meanwhile
            log.warning("master %s was forgotten by the cluster; registering again", self.master_id)
            if not await self._register(again=True):
                return
            await self._reclaim(list(self.table.sessions.values()))
        ttl = self.settings.master_dead_after
        if await self.db(self.store.take_lease, SINGLETON, self.master_id, ttl, now, instance) and self.shared:
            was = self.is_singleton
            # a margin: the lease is counted lost a beat before others may take it
            self._singleton_until = started + max(ttl - self.settings.cluster_heartbeat, ttl / 2)
            if not was:
                log.info("master %s runs the cluster's singleton work", self.master_id)
                self._gone_grace_from = time.monotonic() + max(
                    0.0, self.settings.startup_grace - self.settings.offline_grace)
        elif self.shared:
            self._singleton_until = 0.0
        await self._refresh_masters()

    async def _refresh_masters(self) -> None:
        # ages by the store's clock, so masters whose clocks disagree still agree on who is alive
        now = time.monotonic()
        self._live = {m["id"]: now - m["heartbeat_age"] for m in await self.db(self.store.masters)}

    def _is_live(self, master_id: str) -> bool:
        seen = self._live.get(master_id)
        return seen is not None and time.monotonic() - seen < self.settings.master_dead_after

    async def _reclaim(self, sessions: list[Session]) -> None:
        """Claim again sessions the store dropped while this master seemed dead, unless their
        agents moved on meanwhile (then the local session is the stale one: it closes)."""
        def claim() -> list[int | None]:
            return [self.store.reclaim_session(s.uuid, self.master_id, s.epoch) for s in sessions]

        for session, epoch in zip(sessions, await self.db(claim), strict=True):
            if epoch is not None:
                session.epoch = epoch
            elif self.table.sessions.get(session.uuid) is session:
                session.close("the agent moved to another master meanwhile")
                self.table.session_ended(session, reason="moved to another master", offline=False)

    async def _singleton_tenures(self) -> None:
        """A task group per stretch of holding the lease: singleton work started in it (the
        release drivers) is cancelled when the lease is lost."""
        while True:
            while not self.is_singleton:  # noqa: ASYNC110 - the lease is renewed by the heartbeat
                await anyio.sleep(0.2)
            async with anyio.create_task_group() as tg:
                self.singleton_group = tg
                while self.is_singleton:  # noqa: ASYNC110
                    await anyio.sleep(0.2)
                self.singleton_group = None
                log.warning("master %s lost the singleton lease; its singleton work stops", self.master_id)
                tg.cancel_scope.cancel()

    async def _sweep_loop(self) -> None:
        while True:
            with anyio.move_on_after(self.settings.dispatch_sweep):
                await self._kick.wait()
            self._kick = anyio.Event()
            try:
                await self.sweep()
            except Exception:  # housekeeping must never take the master down
                log.exception("cluster sweep failed; trying again")

    async def sweep(self) -> None:
        """One pass of the dispatch sweep (and, as singleton, of the singleton work)."""
        if self.twin is not None:
            return  # (another process of this id sends this id's tasks)
        if self.shared and not self.table.stopping:
            await self._drop_ended()
            self._sweeps += 1
            if self._sweeps % _SUPERSEDED_EVERY == 0:  # (wake-ups tell at once; this is for lost ones)
                await self._check_superseded()
            await self._send_held()
        if self.is_singleton and not self.table.stopping:
            if self.shared:
                await self._bury_dead()
                await self._write_off_gone()
            for work in self.singleton_work:
                await work()

    # -- the dispatch sweep's parts -----------------------------------------------------------
    async def _drop_ended(self) -> None:
        ended = self.table.take_ended()
        if ended:
            def drop() -> None:
                for uuid, epoch in ended:
                    self.store.drop_session(uuid, self.master_id, epoch)

            await self.db(drop)

    async def _check_superseded(self) -> None:
        local = list(self.table.sessions.values())
        if not local:
            return
        holders = await self.db(self.store.session_holders, [s.uuid for s in local])
        lost: list[Session] = []
        for session in local:
            holder = holders.get(session.uuid)
            if holder is None:
                lost.append(session)  # dropped while this master seemed dead: claim it again
            elif holder != (self.master_id, session.epoch) and holder[1] >= session.epoch:
                self.table.supersede(session.uuid, holder[1], f"superseded by a handshake on master {holder[0]}")
        if lost:
            await self._reclaim([s for s in lost if self.table.sessions.get(s.uuid) is s])

    async def _send_held(self) -> None:
        def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return self.store.pending_tasks_held_by(self.master_id), self.store.cancels_held_by(self.master_id)

        pending, cancels = await self.db(read)
        if pending:
            await self.dispatch.send_held(pending)
        todo = [c for c in cancels if c["taskid"] not in self._cancels_sent]
        # remembered while the store still asks: a cancel goes out once per task and master
        sent = self._cancels_sent | set(self.dispatch.send_cancels(todo))
        self._cancels_sent = {c["taskid"] for c in cancels} & sent

    # -- singleton work -----------------------------------------------------------------------
    async def _bury_dead(self) -> None:
        dead = [m for m in await self.db(self.store.dead_masters, time.time(), self.settings.master_dead_after)
                if m != self.master_id]
        for master_id in dead:
            def bury(m: str = master_id) -> list[str]:
                dropped = self.store.drop_sessions_of(m)
                self.store.forget_master(m)
                return dropped

            dropped = await self.db(bury)
            log.warning("master %s is dead (no heartbeat for %.0fs): dropped its %d sessions", master_id,
                        self.settings.master_dead_after, len(dropped))

    async def _write_off_gone(self) -> None:
        """Open tasks of agents that no master has held for ``offline_grace`` end offline or
        error (on one master, Hub.sweep's offline clocks do this)."""
        def read() -> tuple[list[str], dict[str, tuple[str, int]]]:
            uuids = self.store.open_task_agents()
            return uuids, self.store.session_holders(uuids)

        uuids, holders = await self.db(read)
        now = time.monotonic()
        gone = {u for u in uuids if u not in holders}
        if any(u in holders for u in self._gone):
            # agents that were gone are coming back (a dead master's agents reconnect at the rate
            # the survivors take handshakes, minutes for thousands): the rest may be among them,
            # so their grace starts again, until a whole grace passes with none returning
            self._gone_grace_from = max(self._gone_grace_from, now)
            self._gone = {}
        start = max(now, self._gone_grace_from)
        self._gone = {u: self._gone.get(u, start) for u in gone}
        due = [u for u, since in self._gone.items() if now - since >= self.settings.offline_grace]
        for uuid in due:
            del self._gone[uuid]
        await self.dispatch.write_off_gone(due)

    # -- wake-ups -----------------------------------------------------------------------------
    def _on_wakeup(self, ids: list[str]) -> None:
        for item in ids:
            kind, _, rest = item.partition(":")
            if kind == "d":
                self._kick.set()
            elif kind == "s":
                uuid, _, epoch = rest.rpartition(":")
                if uuid and epoch.isdigit():
                    self.table.supersede(uuid, int(epoch), "superseded by a handshake on another master")

    def _reconnected(self) -> None:
        """The LISTEN connection was replaced: whatever it missed is swept for now."""
        self._kick.set()
        self.events.wake_all()

    def _send_soon(self, channel: str, ids: list[str]) -> None:
        tg = getattr(self, "_tg", None)
        if tg is not None and self._wakeups is not None:
            tg.start_soon(self._send, channel, ids)

    async def _send(self, channel: str, ids: list[str]) -> None:
        assert self._wakeups is not None
        try:
            await self._wakeups.send(channel, ids)
        except Exception:  # lost: the receiver's sweep finds the work anyway
            log.warning("could not send a wake-up on %s; the sweep repairs it", channel, exc_info=True)

    async def _publish_loop(self) -> None:
        """Changed run ids go out on ``zy_runs``, whatever piled up since the last send in one."""
        while True:
            ids = await self.events.take_published()
            await self._send(RUNS_CHANNEL, sorted(ids))

    async def _reread_loop(self) -> None:
        while True:
            await anyio.sleep(_REREAD)
            self.events.wake_all()
