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

from hcsdk._channel import Channel
from hcsdk._mailbox import Mailbox
from hcsdk._wire import encode_frame

from .tamper import Tamper
from .tracker import Tracker

log = logging.getLogger("zy.proxy")


class Downstream(Mailbox):
    """A client connected to this proxy. ``routes`` holds its own uuid and the uuids of the
    clients behind it (when it is a proxy itself)."""

    def __init__(self, uuid: str, sid: str, mode: str):
        super().__init__(uuid)
        self.sid = sid
        self.mode = mode
        self.routes = {uuid}
        #: the connection this one took over from in an online update
        self.retired: Downstream | None = None


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
    def __init__(self, uuid: str, channel_factory: Any, tamper: Tamper | None = None):
        self.uuid = uuid
        self.queue = UpstreamQueue()
        self.by_sid: dict[str, Downstream] = {}
        self.by_uuid: dict[str, Downstream] = {}
        self.routes: dict[str, Downstream] = {}
        self.tamper = tamper or Tamper("")
        self.stats = {"up_frames": 0, "down_frames": 0, "clients": 0}
        #: who holds which release chunk, among the clients here (P2P)
        self.tracker = Tracker()
        self.channel: Channel = channel_factory(self)

    # -- upstream -----------------------------------------------------------------------------
    def from_upstream(self, msg: dict[str, Any]) -> None:
        target = self.routes.get(str(msg.get("uuid")))
        if target is None or msg.get("uuid") == self.uuid:
            return  # our own heartbeats, or a client that left: the master redelivers later
        self.stats["down_frames"] += 1
        target.send(self.tamper.down(msg))

    def upstream_lost(self) -> None:
        """What was queued or in flight is gone: make every client reconnect and resend."""
        for client in list(self.by_sid.values()):
            self.end(client, "upstream channel lost", notify=False)
        self.routes.clear()
        self.queue.clear()

    # -- clients ------------------------------------------------------------------------------
    def attach(self, uuid: str, mode: str, handover: bool = False) -> Downstream:
        """A client handshook. With ``handover`` (a new build of an agent taking over) the old
        connection keeps its session, so its uplink still reports what it runs; what comes down
        goes to the new one."""
        old = self.by_uuid.get(uuid)
        client = Downstream(uuid, secrets.token_hex(8), mode)
        if old is not None and handover:
            client.retired = old
        elif old is not None:
            self.end(old, "superseded by a new handshake", notify=False)
        self.by_sid[client.sid] = client
        self.by_uuid[uuid] = client
        self.routes[uuid] = client
        self.stats["clients"] = len(self.by_uuid)
        return client

    def refused(self, client: Downstream) -> None:
        """The master refused ``client``'s handshake: forget it, and give back what it was to
        take over from."""
        self.end(client, "handshake refused upstream", notify=False)
        old = client.retired
        if old is not None and not old.closed.is_set() and old.uuid not in self.by_uuid:
            self.by_uuid[old.uuid] = self.routes[old.uuid] = old

    def route(self, uuid: str, via: Downstream) -> None:
        """A client behind the proxy ``via`` handshook through us."""
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
                    self._up({"t": "bye", "uuid": uuid, "cmd": "", "taskid": "", "seq": 0})
        self.stats["clients"] = len(self.by_uuid)

    async def from_client(self, client: Downstream, msgs: list[dict[str, Any]]) -> None:
        for msg in msgs:
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
            for out in self.tamper.up(msg):
                self._up(out)

    def _up(self, msg: dict[str, Any]) -> None:
        self.stats["up_frames"] += 1
        self.queue.put(encode_frame(msg))
