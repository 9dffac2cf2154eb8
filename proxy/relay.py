"""The relay: one upstream channel shared by every client behind this proxy.

Clients (agents, or proxies further out) connect here as they would to the master. Their
handshakes are forwarded upstream, where the master checks their credentials; what they send
goes up the proxy's single channel, framed and routed by uuid; what comes down is routed by
uuid to the client it is for. Nothing here is durable: if the upstream channel drops, every
client is disconnected, and they resend from their own spools when they come back.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from typing import Any

import anyio

from hcsdk.net.channel import Channel
from hcsdk.net.mailbox import Mailbox
from hcsdk.protocol.errors import MessageError
from hcsdk.protocol.messages import UP, Bye, parse
from hcsdk.protocol.wire import FrameError, encode_frame

from .tracker import Releases, Tracker

log = logging.getLogger("zy.proxy")

#: messages for a uuid kept while its handshake is in flight (the master's redelivery of its
#: open tasks, acks); beyond this they are dropped, and the master redelivers after a handshake
MAX_HELD = 10_000


class Downstream(Mailbox):
    """A client connected to this proxy. ``routes`` holds its own uuid and the uuids of the
    clients behind it (when it is a proxy itself). ``cred_hash`` is SHA-256 of the credential the
    master accepted in its handshake: every request in the session must carry that credential,
    so a session id alone (which travels in query strings) admits nobody."""

    def __init__(self, uuid: str, sid: str, mode: str, cred_hash: bytes = b""):
        super().__init__(uuid)
        self.sid = sid
        self.mode = mode
        self.cred_hash = cred_hash
        self.routes = {uuid}
        #: the connection this one took over from in an online update
        self.retired: Downstream | None = None


class Pending:
    """A handshake for ``uuid`` forwarded upstream and not answered yet. The master redelivers
    the uuid's open tasks while it handles the handshake, so what comes down for the uuid
    meanwhile is held here; the answer decides where it goes: to the new session or route when
    the master accepts, else to the old one, which nothing has touched (a forged or garbage
    handshake then costs the real client a round trip's delay, not its session)."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.held: list[dict[str, Any]] = []
        self.dropped = 0

    def hold(self, msg: dict[str, Any]) -> None:
        if len(self.held) < MAX_HELD:
            self.held.append(msg)
        else:
            self.dropped += 1


class UpstreamQueue:
    """Frames waiting for the upstream channel, in order, with ids the channel client pages by."""

    def __init__(self, limit: int = 16 * 1024 * 1024):
        self._items: deque[tuple[int, bytes]] = deque()
        self._next = 1
        self._size = 0
        self._limit = limit
        self._wake = anyio.Event()
        self._space = anyio.Event()
        self._space.set()

    def put(self, frame: bytes) -> None:
        self._items.append((self._next, frame))
        self._next += 1
        self._size += len(frame)
        self._wake.set()
        if self._size > self._limit:
            self._space = anyio.Event()

    async def room(self) -> None:
        """Wait while the queue is over its limit (clients are read no faster than we send)."""
        await self._space.wait()

    def pending_after(self, last_id: int) -> list[tuple[int, bytes]]:
        while self._items and self._items[0][0] <= last_id:  # handed to the channel already
            self._size -= len(self._items.popleft()[1])
        if self._size <= self._limit:
            self._space.set()
        out: list[tuple[int, bytes]] = []
        size = 0
        for item in self._items:
            if out and size + len(item[1]) > 2 * 1024 * 1024:
                break
            out.append(item)
            size += len(item[1])
        return out

    def current_wake(self) -> anyio.Event:
        if self._wake.is_set():
            self._wake = anyio.Event()
        return self._wake

    def clear(self) -> None:
        self._items.clear()
        self._size = 0
        self._space.set()


class Relay:
    def __init__(self, uuid: str, channel_factory: Any):
        self.uuid = uuid
        self.queue = UpstreamQueue()
        self.by_sid: dict[str, Downstream] = {}
        self.by_uuid: dict[str, Downstream] = {}
        self.routes: dict[str, Downstream] = {}
        self.stats = {"up_frames": 0, "down_frames": 0, "clients": 0}
        #: uuid -> its handshake in flight upstream (one at a time per uuid)
        self.pending: dict[str, Pending] = {}
        #: who holds which release chunk, among the clients here (P2P)
        self.tracker = Tracker()
        #: which chunks belong to releases the master sent each uuid (what the tracker accepts)
        self.releases = Releases()
        self.channel: Channel = channel_factory(self)

    # -- upstream -----------------------------------------------------------------------------
    def from_upstream(self, msg: dict[str, Any]) -> None:
        uuid = str(msg.get("uuid"))
        if uuid == self.uuid:
            return  # our own heartbeats
        self.releases.note(msg)
        pending = self.pending.get(uuid)
        if pending is not None:
            pending.hold(msg)
            return
        self.deliver(uuid, msg)

    # The relay's two data paths, :meth:`deliver` (down, to a client) and :meth:`forward` (up,
    # what a client sent), are where a subclass sees every relayed message: tests/tampering_proxy.py
    # simulates a compromised relay so (``serve(settings, relay_class=...)``).
    def deliver(self, uuid: str, msg: dict[str, Any]) -> None:
        """A message from upstream for ``uuid``, to the client it is routed through."""
        target = self.routes.get(uuid)
        if target is None:
            return  # a client that left: the master redelivers after its next handshake
        self.stats["down_frames"] += 1
        target.send([msg])

    def upstream_lost(self) -> None:
        """What was queued or in flight is gone: make every client reconnect and resend."""
        for client in list(self.by_sid.values()):
            self.end(client, "upstream channel lost", notify=False)
        self.routes.clear()
        self.queue.clear()

    # -- handshakes ---------------------------------------------------------------------------
    def begin(self, uuid: str) -> Pending | None:
        """A handshake for ``uuid`` is about to go upstream; None while another one is in flight
        (one at a time per uuid: a flood of them holds nothing more)."""
        if uuid in self.pending:
            return None
        pending = self.pending[uuid] = Pending(uuid)
        return pending

    def settle(self, pending: Pending) -> None:
        """The handshake is over. Unless it was accepted (then :meth:`accept` or
        :meth:`accept_route` already took what was held), what came down meanwhile goes where
        the uuid was routed before, or nowhere."""
        if self.pending.get(pending.uuid) is not pending:
            return
        del self.pending[pending.uuid]
        if pending.dropped:
            log.warning("%d messages for %s dropped while its handshake was in flight", pending.dropped, pending.uuid)
        for msg in pending.held:
            self.deliver(pending.uuid, msg)
        pending.held.clear()

    def accept(self, pending: Pending, mode: str, cred_hash: bytes, handover: bool = False) -> Downstream:
        """The master accepted a client's own handshake: give it a session here, replacing the
        uuid's old one (only now), with what came down while the handshake was in flight."""
        client = self.attach(pending.uuid, mode, handover, cred_hash)
        self.settle(pending)
        return client

    def accept_route(self, pending: Pending, via: Downstream) -> None:
        """The master accepted a handshake that the proxy ``via`` forwarded for a client behind it."""
        self.route(pending.uuid, via)
        self.settle(pending)

    # -- clients ------------------------------------------------------------------------------
    def attach(self, uuid: str, mode: str, handover: bool = False, cred_hash: bytes = b"") -> Downstream:
        """A client handshook. With ``handover`` (a new build of an agent taking over) the old
        connection keeps its session, so its uplink still reports what it runs; what comes down
        goes to the new one."""
        old = self.by_uuid.get(uuid)
        client = Downstream(uuid, secrets.token_urlsafe(24), mode, cred_hash)
        if old is not None and handover:
            client.retired = old
        elif old is not None:
            self.end(old, "superseded by a new handshake", notify=False)
        self.by_sid[client.sid] = client
        self.by_uuid[uuid] = client
        self.routes[uuid] = client
        self.stats["clients"] = len(self.by_uuid)
        return client

    def route(self, uuid: str, via: Downstream) -> None:
        """A client behind the proxy ``via`` handshook through us."""
        before = self.routes.get(uuid)
        if before is not None and before is not via and before.uuid != uuid:
            before.routes.discard(uuid)  # that proxy no longer speaks for it
        self.routes[uuid] = via
        via.routes.add(uuid)

    def end(self, client: Downstream, reason: str, notify: bool = True) -> None:
        client.close(reason)
        self.tracker.forget(client.sid)
        self.by_sid.pop(client.sid, None)
        if self.by_uuid.get(client.uuid) is client:
            del self.by_uuid[client.uuid]
        for uuid in client.routes:
            if self.routes.get(uuid) is client:
                del self.routes[uuid]
                if notify:
                    self._up(Bye(uuid=uuid).to_wire())
        self.stats["clients"] = len(self.by_uuid)

    async def from_client(self, client: Downstream, msgs: list[dict[str, Any]]) -> None:
        """What a client sent up. Each message's shape is checked here as the master checks it
        (its MAC only the master can check): the master drops the session a malformed message
        comes in, which for us is the one upstream channel every client shares, so one client
        could cut them all off again and again. FrameError drops only the sender."""
        for msg in msgs:
            try:
                parse(msg, UP)
            except MessageError as exc:
                raise FrameError(f"malformed {msg.get('t')!r} message: {exc.reason}") from None
            uuid, kind = str(msg.get("uuid")), msg["t"]
            if uuid not in client.routes or (kind == "hb" and uuid == client.uuid):
                continue  # a client speaks only for itself and those behind it
            if kind == "bye":
                if uuid != client.uuid and self.routes.get(uuid) is client:
                    del self.routes[uuid]
                    client.routes.discard(uuid)
                    self._up(msg)
                continue
            await self.queue.room()
            self.forward(msg)

    def forward(self, msg: dict[str, Any]) -> None:
        """A client's message (checked by :meth:`from_client`), up the channel."""
        self._up(msg)

    def _up(self, msg: dict[str, Any]) -> None:
        self.stats["up_frames"] += 1
        self.queue.put(encode_frame(msg))
