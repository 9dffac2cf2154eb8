"""The master's table of connected agents and proxies: who is online, through which proxy,
with which end-to-end key, since when an agent is offline, and the hand-over of an updating
agent from its old build to its new one.

Memory only: a session lost with the master is rebuilt by the agent's next handshake, and
whatever was on its way is redelivered from the store (see ``master.dispatch``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from hcsdk.net.mailbox import Mailbox
from hcsdk.protocol import vocab
from hcsdk.protocol.messages import Message
from hcsdk.protocol.tasks import ChannelMode, SessionKind, is_final

from .store import StoreThread

__all__ = ["Session", "Sessions", "is_handover"]

log = logging.getLogger("zy.master.hub")
#: how stale a connected agent's stored last_seen may be, in seconds (whether it is online is
#: the session's, not this)
SEEN_EVERY = 30.0


class Session(Mailbox):
    """One connected agent or proxy. Its outbox is volatile: anything lost with it is
    redelivered from the store on the agent's next handshake.

    An agent behind proxies has a ``carrier``: the session of the proxy connected to this
    master that relays for it; what is sent to the agent goes into the carrier's outbox, routed
    by uuid. ``via`` lists the proxies on the path, nearest the master first."""

    def __init__(self, uuid: str, sid: str, hostname: str, mode: str, kind: str = SessionKind.AGENT,
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
        #: the store's claim on this session (issue 15): a claim with a higher epoch, by this
        #: master or another, supersedes it
        self.epoch = 0
        #: [taskid, seq] of results stored and not acknowledged yet (see ``defer_ack``)
        self._acks: list[list[Any]] = []
        self._sign_ack: Callable[[list[list[Any]]], dict[str, Any]] | None = None

    def defer_ack(self, pairs: list[list[Any]], sign: Callable[[list[list[Any]]], dict[str, Any]]) -> bool:
        """Hold the acknowledgement of ``pairs`` to ride, as one message with the others held,
        in the next write to this client (``sign`` makes it); True when none was held before."""
        first = not self._acks
        self._acks.extend(pairs)
        self._sign_ack = sign
        return first

    def flush_acks(self) -> None:
        """Send what acknowledgements are held, if no other write took them meanwhile."""
        if self._acks:
            self.send([])

    def _take_acks(self) -> list[dict[str, Any]]:
        if not self._acks or self._sign_ack is None:
            return []
        pairs, self._acks = self._acks, []
        return [self._sign_ack(pairs)]

    def send(self, msgs: list[dict[str, Any]]) -> None:
        if self._acks:
            msgs = [*self._take_acks(), *msgs]
        if self.carrier is not None:
            self.carrier.send(msgs)
        else:
            super().send(msgs)

    def take_frames(self, max_frame: int, max_bytes: int = 256 * 1024) -> bytes:
        if self._acks:  # a heartbeat or a poll's answer takes them too
            self.outbox.extendleft(self._take_acks())
        return super().take_frames(max_frame, max_bytes)


async def is_handover(db: StoreThread, uuid: str, taskid: str) -> bool:
    """Whether ``taskid`` is an open update of agent ``uuid`` (so a handshake naming it is the
    new build taking over, not a restart)."""
    task = await db(db.store.task, taskid)
    return bool(task and task["uuid"] == uuid and task["cmd"] == vocab.UPDATE and not is_final(task["status"]))


class Sessions:
    """Sessions by uuid (``sessions``: what commands go to), the old builds still reporting
    during an update (``retiring``), the agents' end-to-end keys, and offline clocks."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        #: old builds of agents that are handing over to a new one: their uplink stays open
        self.retiring: dict[str, Session] = {}
        #: uuid -> monotonic time it went offline: its open tasks are written off after a grace
        self.offline_since: dict[str, float] = {}
        self.keys: dict[str, bytes] = {}
        #: once set, ended sessions no longer start offline clocks (the master is going away)
        self.stopping = False
        #: uuid -> wall time of its last message since the last flush to the store
        self._seen: dict[str, float] = {}
        #: when each connected agent's last_seen was last written (see SEEN_EVERY)
        self._written: dict[str, float] = {}
        #: with several masters (``track_ended``): (uuid, epoch) of sessions that left the table,
        #: for the cluster to drop from the store (``take_ended``)
        self.track_ended = False
        self._ended: list[tuple[str, int]] = []

    # -- end-to-end keys ----------------------------------------------------------------------
    def set_key(self, uuid: str, key: bytes) -> None:
        self.keys[uuid] = key

    def authentic(self, msg: Message) -> bool:
        """Whether ``msg`` carries the MAC of its agent's key, over exactly the envelope received."""
        key = self.keys.get(msg.uuid)
        return key is not None and msg.verify(key)

    def key(self, uuid: str) -> bytes:
        """The end-to-end key shared with agent ``uuid``: what signs the master's messages to it."""
        return self.keys[uuid]

    # -- opening and ending -------------------------------------------------------------------
    def open(self, session: Session, old: Session | None, handover: str | None) -> None:
        """``session`` becomes the one of its uuid, replacing ``old`` (the one seen when the
        handshake began): ended, or kept reporting as retiring when ``handover`` names the open
        update task it hands over for."""
        uuid = session.uuid
        if old and handover:
            # step 4 of an online update: new commands go to the new agent from now on, while the
            # old one keeps its channel to report what it still runs
            self.retiring[uuid] = old
            log.info("agent %s hands over to its new build (update task %s)", uuid, handover)
        elif old:
            self.session_ended(old, reason="superseded by a new handshake", offline=False)
        if session.carrier is not None:
            session.carrier.children.add(uuid)
        self.sessions[uuid] = session
        self.offline_since.pop(uuid, None)

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
            if self.track_ended:
                self._ended.append((session.uuid, session.epoch))
            back = self.retiring.pop(session.uuid, None)
            if back is not None and not back.closed.is_set():
                # a new build that died while the old one was still handing over: the old one
                # is the agent again (it reconnects as such once it notices)
                self.sessions[session.uuid] = back
                log.warning("agent %s: the new build went away during its update; the old one carries on",
                            session.uuid)
            elif offline and not self.stopping:
                self.offline_since[session.uuid] = time.monotonic()

    def close_all(self, reason: str) -> None:
        """Stop for good: close every channel, and start no offline clock from now on."""
        self.stopping = True
        for session in list(self.sessions.values()):
            session.close(reason)

    # -- lookups on the uplink ----------------------------------------------------------------
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

    # -- housekeeping -------------------------------------------------------------------------
    def take_seen(self) -> dict[str, float]:
        """Last-message times for the store's ``last_seen``: a connected agent's once every
        SEEN_EVERY seconds at most (a fan-out or 10,000 heartbeats would otherwise rewrite every
        agent's row each second), and the last one of an agent whose session ended."""
        due = {u: t for u, t in self._seen.items()
               if u not in self.sessions or t - self._written.get(u, 0.0) >= SEEN_EVERY}
        for uuid, stamp in due.items():
            del self._seen[uuid]
            if uuid in self.sessions:
                self._written[uuid] = stamp
            else:
                self._written.pop(uuid, None)
        return due

    def take_ended(self) -> list[tuple[str, int]]:
        """(uuid, epoch) of the sessions that left the table since the previous call."""
        ended, self._ended = self._ended, []
        return ended

    def supersede(self, uuid: str, epoch: int, reason: str) -> bool:
        """End the session of ``uuid`` if its claim is older than ``epoch`` (a handshake on
        another master took the agent); whether one was ended."""
        session = self.sessions.get(uuid)
        if session is None or session.epoch >= epoch:
            return False
        log.info("agent %s: %s", uuid, reason)
        session.close(reason)
        self.session_ended(session, reason=reason, offline=False)
        return True

    def end_silent(self, now: float, dead_after: float, idle_beat: float) -> None:
        """End direct sessions that sent nothing for too long (carried ones end with their proxy)."""
        # an HTTP/2 channel's liveness is the connection's PINGs (granian closes it when they go
        # unanswered); its application heartbeats only show it is not wedged. (Two cut-offs
        # computed once: this runs every second over every session, 10,000 of them.)
        polled, h2 = now - dead_after, now - max(dead_after, 2.5 * idle_beat)
        silent = [s for table in (self.sessions, self.retiring) for s in table.values()
                  if s.last_rx < (h2 if s.mode == ChannelMode.H2 else polled) and s.carrier is None]
        for session in silent:
            limit = now - (h2 if session.mode == ChannelMode.H2 else polled)
            session.close(f"no traffic for {limit:.0f}s")
            self.session_ended(session)

    def presume_offline(self, uuids: list[str], since: float) -> None:
        """Agents with open tasks that are not connected (yet): offline from ``since`` on."""
        for uuid in uuids:
            self.offline_since.setdefault(uuid, since)

    def offline_clocks(self) -> list[tuple[str, float]]:
        return list(self.offline_since.items())

    def stop_clock(self, uuid: str, since: float) -> bool:
        """Stop the offline clock of ``uuid`` if it still reads ``since`` (the agent did not come
        back meanwhile); whether it did."""
        if self.offline_since.get(uuid) != since:
            return False
        del self.offline_since[uuid]
        return True
