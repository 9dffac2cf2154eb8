"""The proxy's routes: the same channel protocol the master serves, so a client cannot tell a
proxy from the master. Credentials are checked by the master (handshakes are forwarded); here
a session id, issued only after the master accepted a handshake, is what admits a client."""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from urllib.parse import quote

import anyio
import httpx

from hcsdk._asgi import (
    Receive,
    Scope,
    Send,
    body_chunks,
    dispatch,
    error,
    header,
    query,
    read_body,
    respond,
)
from hcsdk._channel import ChannelLost
from hcsdk._e2e import sign
from hcsdk._h2conn import Response
from hcsdk._mailbox import stream_mailbox
from hcsdk._wire import UP_TYPES, FrameDecoder, FrameError, encode_frame, loads

from .cache import Answer, ChunkCache, UpstreamDown
from .relay import Downstream, Relay
from .tracker import TrackerError

log = logging.getLogger("zy.proxy.app")

#: how long a tracker ``next`` with nothing to hand out waits for a chunk to change hands
NEXT_WAIT = 2.0
#: credentials remembered for reading the cache while the upstream is away (one per client)
_MAX_ACCEPTED = 100_000


class ProxyApp:
    def __init__(self, relay: Relay, ca_path: Path, heartbeat: float, poll_wait: float, max_frame: int,
                 max_body: int = 16 * 1024 * 1024, idle_beat: float = 60.0, cache: ChunkCache | None = None):
        self.relay = relay
        #: the CDN edge: every blob served here is kept (``limit`` 0: passed through, not kept)
        self.cache = cache if cache is not None else ChunkCache(Path("/nonexistent"), 0)
        #: uuid -> SHA-256 of the credential the upstream last accepted in a handshake of that
        #: client: while the proxy has no upstream (and so no sessions), it may still read the cache
        self._accepted: dict[str, bytes] = {}
        self.ca_path = ca_path
        self.heartbeat = heartbeat
        self.idle_beat = idle_beat
        self.poll_wait = poll_wait
        self.max_frame = max_frame
        self.max_body = max_body
        self.routes = {
            ("GET", "/v1/ca"): self.ca,
            ("POST", "/v1/enroll"): self.enroll,
            ("POST", "/v1/handshake"): self.handshake,
            ("GET", "/v1/channel/down"): self.down,
            ("POST", "/v1/channel/up"): self.up,
            ("POST", "/v1/channel/poll"): self.poll,
            ("GET", "/v1/blob"): self.blob,
            ("POST", "/v1/tracker/announce"): self.announce,
            ("POST", "/v1/tracker/lookup"): self.lookup,
            ("POST", "/v1/tracker/next"): self.next_chunk,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await dispatch(self.routes, scope, receive, send)

    async def ca(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, self.ca_path.read_bytes())

    async def _upstream(self, send: Send, path: str, body: bytes,
                        headers: dict[str, str]) -> httpx.Response | Response | None:
        try:
            return await self.relay.channel.request("POST", path, content=body, headers=headers, timeout=30.0)
        except (ChannelLost, httpx.HTTPError) as exc:
            await error(send, 503, f"the proxy has no upstream right now ({exc}); try again", kind="upstream")
            return None

    async def enroll(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = await self._upstream(send, "/v1/enroll", await read_body(receive, self.max_body),
                                    {"content-type": "application/json"})
        if resp is not None:
            await respond(send, resp.status_code, resp.content, [(b"content-type", b"application/json")])

    async def handshake(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward upstream with our own credential; the client's goes in x-zy-agent-auth."""
        scheme, _, cred = (header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or ":" not in cred:
            await error(send, 401, "agent credential missing", kind="auth")
            return
        via_proxy: Downstream | None = None
        sid = header(scope, b"x-zy-sid")
        if sid is not None:  # a proxy further out forwards a handshake of one of its clients
            via_proxy = self.relay.by_sid.get(sid)
            if via_proxy is None or via_proxy.uuid != cred.partition(":")[0] or via_proxy.closed.is_set():
                await error(send, 409, "forwarding proxy has no live session here; handshake again", kind="session")
                return
            cred = header(scope, b"x-zy-agent-auth") or ""
        via = ",".join(v for v in [self.relay.uuid, header(scope, b"x-zy-via") or ""] if v)
        # Route the claimed uuid *before* forwarding: the master redelivers open tasks while it
        # handles the handshake, and those must find their way here, not be dropped.
        claimed = cred.partition(":")[0]
        mode = "h2" if scope.get("http_version") == "2" else "poll"
        body = await read_body(receive, self.max_body)
        client: Downstream | None = None
        if via_proxy is not None:
            self.relay.route(claimed, via_proxy)
        else:
            client = self.relay.attach(claimed, mode, handover=_names_handover(body))
        up_sid = self.relay.channel.sid or ""
        resp = await self._upstream(send, "/v1/handshake", body,
                                    {"x-zy-agent-auth": cred, "x-zy-sid": up_sid, "x-zy-via": via,
                                     "content-type": "application/json"})
        if resp is None or resp.status_code != 200 or resp.json().get("uuid") != claimed:
            if client is not None:
                self.relay.refused(client)
            elif via_proxy is not None and self.relay.routes.get(claimed) is via_proxy:
                del self.relay.routes[claimed]
                via_proxy.routes.discard(claimed)
            if resp is not None and resp.status_code in (401, 403):
                self._accepted.pop(claimed, None)  # revoked, or a new credential: no more cache reads
            if resp is not None:
                await respond(send, resp.status_code, resp.content, [(b"content-type", b"application/json")])
            return
        info = resp.json()
        if client is not None:
            self._remember(claimed, cred)
        if client is None:
            await respond(send, 200, info)
            return
        await respond(send, 200, {**info, "sid": client.sid, "mode": mode, "heartbeat": self.heartbeat,
                                  "idle_beat": self.idle_beat,
                                  "poll_wait": self.poll_wait, "max_frame": self.max_frame})

    async def announce(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A client holds these chunks and serves them to peers on its port (at the address we
        see it from)."""
        client = await self._client(scope, send)
        if client is None:
            return
        host = (scope.get("client") or ("", 0))[0]
        try:
            held = self.relay.tracker.announce(client.sid, host, loads(await read_body(receive, self.max_body)))
        except (ValueError, TrackerError) as exc:
            await error(send, 400, f"bad announce: {exc}")
            return
        await respond(send, 200, {"held": held})

    async def lookup(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Peers holding each chunk asked for, and how many hold it (rarest first)."""
        client = await self._client(scope, send)
        if client is None:
            return
        try:
            found = self.relay.tracker.lookup(client.sid, loads(await read_body(receive, self.max_body)),
                                              LiveSessions(self.relay.by_sid))
        except (ValueError, TrackerError) as exc:
            await error(send, 400, f"bad lookup: {exc}")
            return
        await respond(send, 200, found)

    async def next_chunk(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Which chunks the agent fetches next, and from where (the tracker schedules the swarm).
        When there is nothing for it yet, the answer waits up to ``NEXT_WAIT`` seconds for a
        chunk to change hands before it says so (no grants)."""
        client = await self._client(scope, send)
        if client is None:
            return
        tracker, live = self.relay.tracker, LiveSessions(self.relay.by_sid)
        try:
            body = loads(await read_body(receive, self.max_body))
            answer = tracker.next(client.sid, body, live, self.cache.__contains__)
            with anyio.move_on_after(NEXT_WAIT):
                while not answer["grants"] and not client.closed.is_set():
                    await tracker.changed.wait()
                    answer = tracker.next(client.sid, {**body, "failed": [], "got": []}, live, self.cache.__contains__)
        except (ValueError, TrackerError) as exc:
            await error(send, 400, f"bad next: {exc}")
            return
        await respond(send, 200, answer)

    async def blob(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A file for a client with a live session, from the chunk cache or fetched upstream on our
        channel and kept (the hash in the client's signed command is what makes it trustworthy; the
        cache checks every chunk against its name too, so it is never the source of a bad one).

        With no upstream channel there are no sessions; a client whose credential the upstream
        accepted in an earlier handshake then still gets what is cached."""
        sha = query(scope).get("sha256", "")
        if self.relay.channel.sid is None and self._known(scope):
            await self.cache.serve(sha, send, None)
            return
        if await self._client(scope, send) is None:
            return
        await self.cache.serve(sha, send, self._fetch)

    async def _fetch(self, sha: str) -> Answer:
        try:
            resp = await self.relay.channel.bulk_request(
                "GET", f"/v1/blob?sha256={quote(sha)}&sid={self.relay.channel.sid or ''}", timeout=120.0)
        except (ChannelLost, httpx.HTTPError) as exc:
            raise UpstreamDown(f"the proxy has no upstream right now ({exc}); try again") from None
        ctype = resp.headers.get("content-type") or "application/octet-stream"
        return Answer(resp.status_code, resp.content, ctype.encode("latin-1"))

    def _remember(self, uuid: str, cred: str) -> None:
        self._accepted.pop(uuid, None)
        self._accepted[uuid] = hashlib.sha256(cred.encode()).digest()
        while len(self._accepted) > _MAX_ACCEPTED:
            del self._accepted[next(iter(self._accepted))]

    def _known(self, scope: Scope) -> bool:
        scheme, _, cred = (header(scope, b"authorization") or "").partition(" ")
        known = self._accepted.get(cred.partition(":")[0])
        return (scheme.lower() == "bearer" and known is not None
                and hmac.compare_digest(known, hashlib.sha256(cred.encode()).digest()))

    async def report_stats(self, key: bytes, every: float) -> None:
        """Send the cache's counters up the channel every ``every`` seconds when they changed (or
        the upstream session is new: the master keeps them in memory only). Signed with our
        end-to-end key, so a proxy in between cannot alter them."""
        last: tuple[str, dict[str, int | float]] | None = None
        while True:
            await anyio.sleep(every)
            sid = self.relay.channel.sid
            if sid is None:
                continue
            stats = self.cache.stats()
            if last == (sid, stats):
                continue
            msg = {"t": "stats", "uuid": self.relay.uuid, "cmd": "", "taskid": "", "seq": 0, "p": {"cache": stats}}
            self.relay.queue.put(encode_frame(sign(key, msg) if key else msg))
            last = (sid, stats)

    async def _client(self, scope: Scope, send: Send) -> Downstream | None:
        scheme, _, cred = (header(scope, b"authorization") or "").partition(" ")
        client = self.relay.by_sid.get(query(scope).get("sid", ""))
        if client is None or client.closed.is_set() or client.uuid != cred.partition(":")[0]:
            await error(send, 409, "session is gone or superseded; handshake again", kind="session")
            return None
        return client

    async def down(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = await self._client(scope, send)
        if client is None:
            return
        try:
            beat = self.idle_beat if client.mode == "h2" else self.heartbeat
            await stream_mailbox(client, receive, send, beat, self.max_frame)
        finally:
            self.relay.end(client, "channel ended")

    async def up(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = await self._client(scope, send)
        if client is None:
            return
        decoder = FrameDecoder(self.max_frame, UP_TYPES)
        try:
            async for chunk in body_chunks(receive):
                await self.relay.from_client(client, decoder.feed(chunk))
        except FrameError as exc:
            await self._drop(client, send, exc)
            return
        await respond(send, 200, {"ok": True})

    async def poll(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = await self._client(scope, send)
        if client is None:
            return
        decoder = FrameDecoder(self.max_frame, UP_TYPES)
        try:
            await self.relay.from_client(client, decoder.feed(await read_body(receive, self.max_body)))
            if decoder.pending:
                raise FrameError("request ends inside a frame")
        except FrameError as exc:
            await self._drop(client, send, exc)
            return
        if query(scope).get("mode") == "up":
            await respond(send, 200, b"")
            return
        with anyio.move_on_after(self.poll_wait):
            await client.wake.wait()
        await respond(send, 200, client.take_frames(self.max_frame, 1024 * 1024))

    async def _drop(self, client: Downstream, send: Send, exc: FrameError) -> None:
        log.warning("dropping client %s: %s", client.uuid, exc)
        self.relay.end(client, f"bad frame: {exc}")
        await error(send, 400, f"bad frame: {exc}", kind="frame")




class LiveSessions:
    """The tracker's view of which session ids are still connected here."""

    def __init__(self, by_sid: dict[str, Downstream]) -> None:
        self.by_sid = by_sid

    def __contains__(self, sid: object) -> bool:
        client = self.by_sid.get(sid) if isinstance(sid, str) else None
        return client is not None and not client.closed.is_set()


def _names_handover(body: bytes) -> bool:
    """Whether a handshake is a new build taking over (a field, not a word anywhere in it)."""
    try:
        hello = loads(body)
    except ValueError:
        return False
    return isinstance(hello, dict) and isinstance(hello.get("handover"), str)
