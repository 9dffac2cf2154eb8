"""The proxy's routes: the same channel protocol the master serves, so a client cannot tell a
proxy from the master. Credentials are checked by the master (handshakes are forwarded); here a
session, opened only after the master accepted a handshake, admits requests that carry its id
and the credential the master accepted for it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx

from hcsdk.net.asgi import Receive, Scope, Send, dispatch, error, header, query, respond
from hcsdk.net.channel import ChannelLost
from hcsdk.net.channel_server import ChannelServer, Credential, Refusal, bearer
from hcsdk.net.h2conn import Response
from hcsdk.net.limits import KeyedSlots, authenticated, read_limited
from hcsdk.net.pacing import SHORT_RETRY
from hcsdk.net.settings import ENROLL_BODY, HANDSHAKE_BODY, ChannelSettings
from hcsdk.net.tls import shared_client_context
from hcsdk.protocol.messages import Stats
from hcsdk.protocol.tasks import ChannelMode
from hcsdk.protocol.wire import FrameError, loads

from .cache import Answer, ChunkCache, Fetch, UpstreamDown
from .relay import Downstream, Pending, Relay
from .tracker import Known, NotGranted, TrackerError, TrackerFull

log = logging.getLogger("zy.proxy.app")

#: how long a tracker ``next`` with nothing to hand out waits for a chunk to change hands
NEXT_WAIT = 2.0
#: credentials remembered for reading the cache while the upstream is away (one per client)
_MAX_ACCEPTED = 100_000
#: bodies the proxy reads before the master has checked who sends them (ENROLL_BODY and
#: HANDSHAKE_BODY, the master's own limits) must all be in within this deadline
UNAUTHENTICATED_DEADLINE = 30.0
#: tracker requests (an announce of 100,000 chunk names is about 6.7 MB) and their deadline
TRACKER_BODY = 8 * 1024 * 1024
BODY_DEADLINE = 60.0
#: blob downloads at once per credential (an agent fetches up to 16 chunks at once)
DOWNLOADS_PER_CREDENTIAL = 32
#: an upstream error body kept to pass on (a blob's 200 is streamed to disk instead)
_ERROR_BODY = 64 * 1024


class ProxyApp:
    def __init__(self, relay: Relay, ca_path: Path, settings: ChannelSettings,
                 max_body: int = 16 * 1024 * 1024, cache: ChunkCache | None = None):
        self.relay = relay
        #: the CDN edge: every blob served here is kept (``limit`` 0: passed through, not kept)
        self.cache = cache if cache is not None else ChunkCache(Path("/nonexistent"), 0)
        #: uuid -> SHA-256 of the credential the upstream last accepted in a handshake of that
        #: client: while the proxy has no upstream (and so no sessions), it may still read the cache
        self._accepted: dict[str, bytes] = {}
        self.ca_path = ca_path
        self.settings = settings
        self.channel = ChannelServer(RelaySessions(relay, settings), settings, max_body, BODY_DEADLINE)
        self._downloads = KeyedSlots(DOWNLOADS_PER_CREDENTIAL)
        #: HTTP/1.1 connections of our own to the upstream for blobs (see :meth:`_fetch`)
        self._bulk: httpx.AsyncClient | None = None
        self._bulk_url = ""
        self.routes = {
            ("GET", "/v1/ca"): self.ca,
            ("POST", "/v1/enroll"): self.enroll,
            ("POST", "/v1/handshake"): self.handshake,
            **self.channel.routes,
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
        body = await read_limited(receive, ENROLL_BODY, UNAUTHENTICATED_DEADLINE, scope)
        resp = await self._upstream(send, "/v1/enroll", body, {"content-type": "application/json"})
        if resp is not None:
            await respond(send, resp.status_code, resp.content, [(b"content-type", b"application/json")])

    async def handshake(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward upstream with our own credential; the client's goes in x-zy-agent-auth.

        Nothing the uuid had here (its session, or its route through a proxy further out) is
        replaced before the master has accepted the credential: a handshake with a garbage
        secret, or one forwarded by a client that is no proxy, must not cut the real client off.
        What comes down for the uuid meanwhile (the master redelivers its open tasks while it
        handles the handshake) is held and goes where the answer says (:class:`Pending`)."""
        cred = bearer(scope)
        if cred is None:
            await error(send, 401, "agent credential missing", kind="auth")
            return
        via_proxy: Downstream | None = None
        sid = header(scope, b"x-zy-sid")
        if sid is not None:  # a proxy further out forwards a handshake of one of its clients
            via_proxy = self.relay.by_sid.get(sid)
            if via_proxy is None or via_proxy.closed.is_set():
                await error(send, 409, "forwarding proxy has no live session here; handshake again", kind="session")
                return
            if not cred.matches(via_proxy.cred_hash):
                await error(send, 401, "the forwarding proxy's credential is not the one of its session", kind="auth")
                return
            authenticated(scope)  # a proxy we carry: its many clients' handshakes come from its address
            cred = Credential(header(scope, b"x-zy-agent-auth") or "")
        if not cred.complete:
            await error(send, 401, "agent credential missing", kind="auth")
            return
        claimed = cred.uuid
        live = self.relay.by_uuid.get(claimed)
        if (via_proxy is None and live is not None and not live.closed.is_set() and live.cred_hash
                and not cred.matches(live.cred_hash)):
            # an agent's credential never changes once it has connected (it cannot enroll again),
            # so this one would be refused upstream: say so here, without holding anything
            await error(send, 401, f"agent credential is not valid for {claimed}", kind="auth")
            return
        body = await read_limited(receive, HANDSHAKE_BODY, UNAUTHENTICATED_DEADLINE, scope)
        pending = self.relay.begin(claimed)
        if pending is None:
            await error(send, 503, f"a handshake for {claimed} is already in flight here; retry after a backoff",
                        kind="busy", retry_after=SHORT_RETRY)
            return
        try:
            await self._forward_handshake(scope, send, pending, cred, body, via_proxy)
        finally:
            self.relay.settle(pending)  # not accepted: what was held goes to the old route

    async def _forward_handshake(self, scope: Scope, send: Send, pending: Pending, cred: Credential, body: bytes,
                                 via_proxy: Downstream | None) -> None:
        claimed = pending.uuid
        # only a proxy we carry may name the proxies further out; a plain client's claim is dropped
        further = (header(scope, b"x-zy-via") or "") if via_proxy is not None else ""
        via = ",".join(v for v in [self.relay.uuid, further] if v)
        resp = await self._upstream(send, "/v1/handshake", body,
                                    {"x-zy-agent-auth": cred.text, "x-zy-sid": self.relay.channel.sid or "",
                                     "x-zy-via": via, "content-type": "application/json"})
        if resp is None:
            return
        if resp.status_code != 200:
            self._refused(claimed, cred, resp.status_code)
            # the master's Retry-After goes on as it is (its JSON too): it paces who is behind us
            after = [(b"retry-after", v.encode("latin-1")) for k, v in resp.headers.items()
                     if k.lower() == "retry-after"]
            await respond(send, resp.status_code, resp.content, [(b"content-type", b"application/json"), *after[:1]])
            return
        info = _json_object(resp.content)
        if info is None or info.get("uuid") != claimed:
            await error(send, 502, f"the upstream accepted a handshake for {claimed} but answered for "
                                   f"{(info or {}).get('uuid')!r}", kind="upstream")
            return
        if via_proxy is not None:
            if via_proxy.closed.is_set():
                await error(send, 409, "forwarding proxy's session ended meanwhile; handshake again", kind="session")
                return
            self.relay.accept_route(pending, via_proxy)
            await respond(send, 200, info)
            return
        mode = ChannelMode.H2 if scope.get("http_version") == "2" else ChannelMode.POLL
        client = self.relay.accept(pending, mode, cred.digest(), handover=_names_handover(body))
        self._remember(cred)
        await respond(send, 200, {**info, "sid": client.sid, "mode": mode, **self.settings.served()})

    def _refused(self, uuid: str, cred: Credential, status: int) -> None:
        """The upstream refused a handshake. A revoked agent (403) reads no more from the cache;
        a wrong credential (401) only forgets the one remembered if it was that one (anybody can
        send a garbage secret for any uuid)."""
        known = self._accepted.get(uuid)
        if status == 403 or (status == 401 and known is not None and cred.matches(known)):
            self._accepted.pop(uuid, None)

    async def announce(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A client holds these chunks and serves them to peers on its port (at the address we
        see it from)."""
        client = await self._client(scope, send)
        if client is None:
            return
        host = (scope.get("client") or ("", 0))[0]
        try:
            body = loads(await read_limited(receive, TRACKER_BODY, BODY_DEADLINE, scope))
            held, ignored = self.relay.tracker.announce(client.sid, host, body, self._known_chunk(client))
        except TrackerError as exc:
            await _tracker_error(send, "announce", exc)
            return
        except ValueError as exc:
            await error(send, 400, f"bad announce: {exc}")
            return
        await respond(send, 200, {"held": held, "ignored": ignored})

    def _known_chunk(self, client: Downstream) -> Known:
        """What ``client`` may be listed for, or scheduled: chunks of releases the master sent it
        through this proxy, and chunks the cache holds (what an agent still holds after a proxy
        restart, which the new process never saw go down)."""
        releases, cache = self.relay.releases, self.cache

        def known(sha: str) -> str | None:
            return releases.known(client.uuid, sha) or (sha if sha in cache else None)

        return known

    async def lookup(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Peers holding each chunk asked for, and how many hold it (rarest first)."""
        client = await self._client(scope, send)
        if client is None:
            return
        try:
            found = self.relay.tracker.lookup(client.sid, loads(await read_limited(receive, TRACKER_BODY,
                                                                                   BODY_DEADLINE, scope)),
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
            body = loads(await read_limited(receive, TRACKER_BODY, BODY_DEADLINE, scope))
            known = self._known_chunk(client)
            answer = tracker.next(client.sid, body, live, self.cache.__contains__, known)
            with anyio.move_on_after(NEXT_WAIT):
                while not answer["grants"] and not client.closed.is_set():
                    await tracker.changed.wait()
                    answer = tracker.next(client.sid, {**body, "failed": [], "got": []}, live,
                                          self.cache.__contains__, known)
        except TrackerError as exc:
            await _tracker_error(send, "next", exc)
            return
        except ValueError as exc:
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
            authenticated(scope)
            await self._serve(scope, send, sha, None)
            return
        if await self._client(scope, send) is None:
            return
        await self._serve(scope, send, sha, self._fetch)

    async def _serve(self, scope: Scope, send: Send, sha: str, fetch: Fetch | None) -> None:
        """At most ``DOWNLOADS_PER_CREDENTIAL`` downloads at once per credential (429 beyond)."""
        uuid = (bearer(scope) or Credential("")).uuid
        with self._downloads.take(uuid) as ok:
            if not ok:
                await error(send, 429, f"{uuid} has {DOWNLOADS_PER_CREDENTIAL} downloads running here already; "
                                       "retry when one ends", kind="busy")
                return
            await self.cache.serve(sha, send, fetch)

    async def _fetch(self, sha: str) -> Answer:
        """Ask the upstream in our own session, on HTTP/1.1 connections of our own beside the
        channel's (as :meth:`Channel.bulk_request` does), with the body streamed: the cache writes
        it to disk as it arrives, so a large build passing through is never held in memory."""
        channel = self.relay.channel
        url = channel.url
        if url is None or channel.sid is None:
            raise UpstreamDown("the proxy has no upstream right now; try again")
        client = await self._bulk_client(url)
        stack = AsyncExitStack()
        timeout = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=None)
        try:
            resp = await stack.enter_async_context(
                client.stream("GET", f"{url}/v1/blob", params={"sha256": sha}, timeout=timeout,
                              headers={"x-zy-sid": channel.sid}))  # a header: never in an access log
        except httpx.ConnectError:  # no new connection now: the channel's own can still carry it
            await stack.aclose()
            return await self._fetch_on_channel(sha)
        except httpx.HTTPError as exc:
            await stack.aclose()
            raise UpstreamDown(f"the proxy's upstream request failed ({exc!r}); try again") from None
        ctype = (resp.headers.get("content-type") or "application/octet-stream").encode("latin-1")
        if resp.status_code == 200:
            return Answer(200, b"", ctype, stream=_body(resp, stack))
        try:
            body = await _capped(resp, _ERROR_BODY)
        finally:
            await stack.aclose()
        return Answer(resp.status_code, body, ctype)

    async def _fetch_on_channel(self, sha: str) -> Answer:
        try:
            resp = await self.relay.channel.request("GET", f"/v1/blob?sha256={quote(sha)}", timeout=120.0,
                                                    headers={"x-zy-sid": self.relay.channel.sid or ""})
        except (ChannelLost, httpx.HTTPError) as exc:
            raise UpstreamDown(f"the proxy has no upstream right now ({exc}); try again") from None
        ctype = resp.headers.get("content-type") or "application/octet-stream"
        return Answer(resp.status_code, resp.content, ctype.encode("latin-1"))

    async def _bulk_client(self, url: str) -> httpx.AsyncClient:
        """Our HTTP/1.1 connections to ``url`` (new ones when the channel moved to another)."""
        if self._bulk is not None and self._bulk_url == url:
            return self._bulk
        old, channel = self._bulk, self.relay.channel
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=60.0)
        transport = httpx.AsyncHTTPTransport(verify=shared_client_context(channel.ca_pem, False), http2=False,
                                             limits=limits, local_address=channel.settings.local_address)
        self._bulk, self._bulk_url = httpx.AsyncClient(transport=transport, headers=channel.headers), url
        if old is not None:
            await old.aclose()
        return self._bulk

    def _remember(self, cred: Credential) -> None:
        self._accepted.pop(cred.uuid, None)
        self._accepted[cred.uuid] = cred.digest()
        while len(self._accepted) > _MAX_ACCEPTED:
            del self._accepted[next(iter(self._accepted))]

    def _known(self, scope: Scope) -> bool:
        cred = bearer(scope)
        known = self._accepted.get(cred.uuid) if cred is not None else None
        return cred is not None and known is not None and cred.matches(known)

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
            msg = Stats(uuid=self.relay.uuid, cache=stats)
            self.relay.queue.put((msg.signed(key) if key else msg).encode())
            last = (sid, stats)

    async def _client(self, scope: Scope, send: Send) -> Downstream | None:
        """The session a tracker or blob request belongs to (see :class:`RelaySessions`)."""
        return await self.channel.session(scope, send)


class RelaySessions:
    """The proxy's session table for the channel routes (hcsdk.net.channel_server.SessionTable):
    the relay's clients. A request names its session by id (``x-zy-sid`` or the ``sid`` query
    parameter) and carries the credential the master accepted when it was opened: the id alone,
    which may be in a middlebox's access log, admits nobody. What comes up is forwarded."""

    def __init__(self, relay: Relay, settings: ChannelSettings) -> None:
        self.relay = relay
        self.settings = settings

    async def attach(self, scope: Scope, credential: Credential | None) -> Downstream | Refusal:
        client = self.relay.by_sid.get(header(scope, b"x-zy-sid") or query(scope).get("sid", ""))
        if client is None or client.closed.is_set():
            return Refusal(409, "session is gone or superseded; handshake again", "session")
        if credential is None or not credential.matches(client.cred_hash):
            return Refusal(401, "agent credential is not valid for this session")
        authenticated(scope)
        return client

    def heartbeat(self, session: Downstream) -> float:
        return self.settings.downlink_beat(session.mode)

    async def deliver(self, session: Downstream, msgs: list[dict[str, Any]]) -> None:
        await self.relay.from_client(session, msgs)

    def ended(self, session: Downstream) -> None:
        self.relay.end(session, "channel ended")

    def drop(self, session: Downstream, exc: FrameError) -> None:
        log.warning("dropping client %s: %s", session.uuid, exc)
        self.relay.end(session, f"bad frame: {exc}")


class LiveSessions:
    """The tracker's view of which session ids are still connected here."""

    def __init__(self, by_sid: dict[str, Downstream]) -> None:
        self.by_sid = by_sid

    def __contains__(self, sid: object) -> bool:
        client = self.by_sid.get(sid) if isinstance(sid, str) else None
        return client is not None and not client.closed.is_set()


async def _body(resp: httpx.Response, stack: AsyncExitStack) -> AsyncIterator[bytes]:
    """A streamed upstream body, its connection released when it ends or is abandoned."""
    try:
        async for block in resp.aiter_bytes():
            yield block
    except httpx.HTTPError as exc:
        raise UpstreamDown(f"the upstream transfer broke off ({exc!r}); try again") from None
    finally:
        await stack.aclose()


async def _capped(resp: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for block in resp.aiter_bytes():
        body += block[:limit - len(body)]
        if len(body) >= limit:
            break
    return bytes(body)


async def _tracker_error(send: Send, what: str, exc: TrackerError) -> None:
    if isinstance(exc, TrackerFull):
        await error(send, 413, f"{what} refused: {exc}", kind="tracker")
    elif isinstance(exc, NotGranted):
        await error(send, 403, f"{what} refused: {exc}", kind="tracker")
    else:
        await error(send, 400, f"bad {what}: {exc}")


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _names_handover(body: bytes) -> bool:
    """Whether a handshake is a new build taking over (a field, not a word anywhere in it)."""
    try:
        hello = loads(body)
    except ValueError:
        return False
    return isinstance(hello, dict) and isinstance(hello.get("handover"), str)
