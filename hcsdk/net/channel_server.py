"""The channel routes the master and a proxy both serve, so a client cannot tell them apart:

    GET  /v1/channel/down   credential+sid   long-lived stream of framed messages to the client
    POST /v1/channel/up     credential+sid   long-lived request body of framed messages from it
    POST /v1/channel/poll   credential+sid   HTTP/1.1 fallback: uplink batch in, downlink batch out
                                             (held up to poll_wait); ?mode=up: uplink only, at once

and the one reading of a client's credential (``Authorization: Bearer UUID:SECRET``). What a
session is, and who may use it, is the side's own: each implements a :class:`SessionTable` (the
master checks credentials against its store and ingests; a proxy matches the credential the
master accepted and forwards upstream). Enrollment and handshakes stay with each side.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import anyio

from hcsdk.net.asgi import Handler, Receive, Scope, Send, body_chunks, error, header, query, respond
from hcsdk.net.limits import read_limited
from hcsdk.net.mailbox import Mailbox, stream_mailbox
from hcsdk.net.settings import ChannelSettings
from hcsdk.protocol.wire import UP_TYPES, FrameDecoder, FrameError

__all__ = ["ChannelServer", "Credential", "Refusal", "SessionTable", "bearer", "bearer_token"]

#: the most one held poll answers with (a client polls again at once when there was more)
POLL_BATCH = 1024 * 1024


@dataclass(frozen=True)
class Credential:
    """``UUID:SECRET`` as a client presents it: in ``Authorization: Bearer``, or relayed by a
    proxy in ``x-zy-agent-auth``. Nothing is checked here; :attr:`complete` says whether it has
    both parts."""

    text: str

    @property
    def uuid(self) -> str:
        return self.text.partition(":")[0]

    @property
    def secret(self) -> str:
        return self.text.partition(":")[2]

    @property
    def complete(self) -> bool:
        return bool(self.uuid and self.secret)

    def digest(self) -> bytes:
        """SHA-256 of the whole credential: what a proxy keeps of one the master accepted."""
        return hashlib.sha256(self.text.encode()).digest()

    def matches(self, digest: bytes) -> bool:
        """Whether this is the credential ``digest`` was taken of (an empty digest matches none)."""
        return bool(digest) and hmac.compare_digest(digest, self.digest())


def bearer_token(scope: Scope) -> str | None:
    """Whatever ``Authorization: Bearer TOKEN`` carries (a client's credential, the master's API
    token), or None: the one place that header is read."""
    scheme, _, token = (header(scope, b"authorization") or "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def bearer(scope: Scope) -> Credential | None:
    """The credential in ``Authorization: Bearer UUID:SECRET``, or None."""
    cred = bearer_token(scope)
    return Credential(cred) if cred is not None and ":" in cred else None


@dataclass(frozen=True)
class Refusal:
    """Why a request gets no session: answered as ``{"error": message, "kind": kind}``."""

    status: int
    message: str
    kind: str = "auth"

    async def send(self, send: Send) -> None:
        await error(send, self.status, self.message, self.kind)


S = TypeVar("S", bound=Mailbox)


class SessionTable(Protocol[S]):
    """The sessions a side serves channels for. A session is a :class:`Mailbox` (what is waiting
    to go down) with a ``mode``; the table decides who owns one and what happens to what comes up."""

    async def attach(self, scope: Scope, credential: Credential | None) -> S | Refusal:
        """The session a channel request belongs to (its ``sid``), once the request's credential
        is checked for it; or why not. Marks the request authenticated (hcsdk.net.limits) when
        the credential is good."""
        ...

    def heartbeat(self, session: S) -> float:
        """Seconds between heartbeats on the session's idle downlink."""
        ...

    async def deliver(self, session: S, msgs: list[dict[str, Any]]) -> None:
        """Messages the session's client sent up (framed, of uplink types). FrameError drops the
        session (a malformed message)."""
        ...

    def ended(self, session: S) -> None:
        """The session's downlink stream ended (the client left, or the session was closed)."""
        ...

    def drop(self, session: S, exc: FrameError) -> None:
        """The client sent something that is not a valid frame or message: end its session (the
        others are not affected)."""
        ...


class ChannelServer(Generic[S]):
    """The three channel routes (:attr:`routes`, for hcsdk.net.asgi.dispatch) over ``table``.
    ``max_body`` and ``poll_body_timeout`` bound a poll batch (its sender has authenticated; the
    deadline only ends stalls)."""

    def __init__(self, table: SessionTable[S], settings: ChannelSettings, max_body: int,
                 poll_body_timeout: float) -> None:
        self.table = table
        self.settings = settings
        self.max_body = max_body
        self.poll_body_timeout = poll_body_timeout
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/channel/down"): self.down,
            ("POST", "/v1/channel/up"): self.up,
            ("POST", "/v1/channel/poll"): self.poll,
        }

    async def session(self, scope: Scope, send: Send) -> S | None:
        """The request's session, or None once the refusal is answered (other routes that need a
        session, like a proxy's tracker, use this too)."""
        found = await self.table.attach(scope, bearer(scope))
        if isinstance(found, Refusal):
            await found.send(send)
            return None
        return found

    async def down(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = await self.session(scope, send)
        if session is None:
            return
        try:
            await stream_mailbox(session, receive, send, self.table.heartbeat(session), self.settings.max_frame)
        finally:
            self.table.ended(session)

    async def up(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = await self.session(scope, send)
        if session is None:
            return
        decoder = FrameDecoder(self.settings.max_frame, UP_TYPES)
        try:
            async for chunk in body_chunks(receive):
                await self.table.deliver(session, decoder.feed(chunk))
        except FrameError as exc:
            await self._drop(session, send, exc)
            return
        await respond(send, 200, {"ok": True})

    async def poll(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = await self.session(scope, send)
        if session is None:
            return
        decoder = FrameDecoder(self.settings.max_frame, UP_TYPES)
        try:
            raw = await read_limited(receive, self.max_body, self.poll_body_timeout, scope)
            await self.table.deliver(session, decoder.feed(raw))
            if decoder.pending:
                raise FrameError("request ends inside a frame")
        except FrameError as exc:
            await self._drop(session, send, exc)
            return
        if query(scope).get("mode") == "up":
            # an uplink-only request: answer at once, and leave downlink messages to the held
            # poll so they reach the client in order
            await respond(send, 200, b"")
            return
        with anyio.move_on_after(self.settings.poll_wait):
            await session.wake.wait()
        await respond(send, 200, session.take_frames(self.settings.max_frame, POLL_BATCH))

    async def _drop(self, session: S, send: Send, exc: FrameError) -> None:
        self.table.drop(session, exc)
        await error(send, 400, f"bad frame: {exc}", kind="frame")
