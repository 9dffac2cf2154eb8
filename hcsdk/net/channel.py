"""The client side of the channel, shared by agents and proxies: handshake, then one of two
carriers, reconnecting for ever with backoff.

- HTTP/2: one TLS connection, a long-lived downlink stream (GET /v1/channel/down) and a
  long-lived uplink stream (POST /v1/channel/up with a streaming body).
- HTTP/1.1 polling, when h2 cannot be had: POST /v1/channel/poll carries a batch of uplink
  frames and returns a batch of downlink frames. While polling, the agent probes h2 again
  in the background and switches back once it works.

Either way the messages are the same frames; what was not acknowledged is resent from the
spool after every reconnect. Reconnects back off exponentially with full jitter; a server
that refuses a handshake as busy and says when to come back is obeyed instead (see
:mod:`hcsdk.net.pacing`), on the same URL.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx

from hcsdk.common.backoff import Backoff
from hcsdk.net.h2conn import H2Connection, H2Error, NotH2, Response
from hcsdk.net.http import error_message
from hcsdk.net.pacing import busy_hint, paced_delay
from hcsdk.net.settings import ChannelSettings as ChannelSettings  # declared once, for both ends
from hcsdk.net.tls import shared_client_context
from hcsdk.protocol.messages import Heartbeat
from hcsdk.protocol.tasks import ChannelMode
from hcsdk.protocol.wire import DEFAULT_MAX_FRAME, DOWN_TYPES, FrameDecoder

log = logging.getLogger("zy.channel")
#: HTTP/1.1 connections for bulk transfers at once (a release fetches 4 chunks at a time)
BULK_CONNECTIONS = 8


class ChannelLost(Exception):
    """The channel ended; the agent reconnects."""


class SwitchToH2(Exception):
    """HTTP/2 works again while we were polling."""


class Rejected(Exception):
    """The master refused this agent's credential: retrying cannot help."""


class Unreachable(ChannelLost):
    """No HTTP answer to the handshake (connection refused or reset, TLS failure, timeout):
    this URL is down, the next one may not be."""


class Busy(ChannelLost):
    """The handshake was refused as busy (503/429/409, ``kind: busy``); ``retry_after`` is the
    wait the server asked for, None when it named none usable."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Channel:
    """Carries frames between an agent and its upstream.

    ``outbox(last_id)`` returns spooled frames after an id, ``on_message(msg)`` handles a
    downlink message, and ``wake()`` returns an event set when the outbox grows. ``on_lost()``
    runs each time an established connection ends. Several URLs (proxies) are tried in turn,
    starting at a random one so that agents spread over them.
    """

    def __init__(self, uuid: str, credential: str, urls: list[str], ca_pem: bytes,
                 facts: Callable[[], dict[str, Any]], labels: dict[str, str],
                 outbox: Callable[[int], list[tuple[int, bytes]]], on_message: Callable[[dict[str, Any]], None],
                 wake: Callable[[], anyio.Event], settings: ChannelSettings | None = None,
                 on_lost: Callable[[], None] | None = None):
        self.uuid = uuid
        self.urls = urls
        self.settings = settings or ChannelSettings()
        self.ca_pem = ca_pem
        self.facts = facts
        self.labels = labels
        self.outbox = outbox
        self.on_message = on_message
        self.wake = wake
        self.headers = {"authorization": f"Bearer {uuid}:{credential}"}
        self.mode: ChannelMode | None = None
        self.connects = 0
        self._url_index = random.randrange(len(urls)) if urls and self.settings.spread else 0
        self.on_lost = on_lost or (lambda: None)
        #: called after each accepted handshake
        self.on_connected: Callable[[], None] = lambda: None
        #: more for every handshake (an agent reports its schedules)
        self.hello_extra: Callable[[], dict[str, Any]] = dict
        #: sent with the next handshake only (a new build taking over names its update task)
        self.hello_once: dict[str, Any] = {}
        #: an agent handing over to its new build: when this connection ends, do not reconnect
        self.retiring = False
        self._resume = anyio.Event()
        self._finish = anyio.Event()
        self._drop: str | None = None
        #: while connected: the client, URL and session id, for requests on the same connection
        self.client: httpx.AsyncClient | None = None
        self.conn: H2Connection | None = None
        #: HTTP/1.1 connections beside ``conn`` for bulk transfers (see :meth:`bulk_request`);
        #: closed when the HTTP/2 session ends, so they always go to ``url``
        self._bulk: httpx.AsyncClient | None = None
        self.url: str | None = None
        self.sid: str | None = None
        self.max_frame = DEFAULT_MAX_FRAME
        self.heartbeat = self.settings.heartbeat
        #: seconds between application heartbeats on a quiet HTTP/2 channel (PINGs keep it alive)
        self.idle_beat = self.settings.heartbeat
        #: whether the master reads a task's output folded into its done (its handshake says)
        self.fold = False
        self.dead_after = self.settings.dead_after
        self.poll_timeout = 30.0

    async def run_forever(self) -> None:
        """Connect, and reconnect for ever. A server that is busy and says when to come back is
        obeyed on the same URL without escalating the backoff (it is alive and has scheduled
        us); a URL that gives no HTTP answer at all moves on to the next at once, and the
        backoff grows only when a whole round of URLs has failed so. Anything else moves to
        the next URL after the backoff, as a lost channel always did."""
        backoff = Backoff(self.settings.backoff_base, self.settings.backoff_cap)
        unreachable = 0  # URLs in a row that gave no HTTP answer
        while True:
            if self.retiring:
                await self._resume.wait()
            url = self.urls[self._url_index % len(self.urls)]
            try:
                await self._connect(url, backoff)
                exc: BaseException = ChannelLost("channel closed")
            except Exception as caught:  # any failure of one connection means: reconnect
                exc = _leaf(caught)
            if isinstance(exc, Rejected):
                raise exc
            if self.retiring:
                log.info("channel to %s ended (%s); handing over, so not reconnecting", url, _describe(exc))
                continue
            if isinstance(exc, SwitchToH2):
                log.info("HTTP/2 reachable again; switching from polling")
                continue
            if isinstance(exc, Busy) and exc.retry_after is not None:
                unreachable = 0
                await self._paced(url, exc, exc.retry_after)
                continue
            log.warning("channel to %s ended: %s", url, _describe(exc))
            self._url_index += 1
            self.mode = None
            unreachable = unreachable + 1 if isinstance(exc, Unreachable) else 0
            if 0 < unreachable < len(self.urls):
                continue  # the round is not over: the next URL at once
            unreachable = 0
            delay = backoff.next_delay()
            log.info("reconnecting in %.1fs", delay)
            await anyio.sleep(delay)

    async def _paced(self, url: str, exc: Busy, asked: float) -> None:
        """Sleep the wait a busy server asked for, within our own bounds (a buggy server must
        not park us beyond the backoff cap, nor spin us with nothing), jittered by ±20 %."""
        delay = paced_delay(asked, self.settings.backoff_base, self.settings.backoff_cap)
        log.info("master busy; retrying in %.1f s (as it asked): %s %s", delay, url, exc)
        await anyio.sleep(delay)

    def _client(self, http2: bool, connections: int = 4) -> httpx.AsyncClient:
        verify = shared_client_context(self.ca_pem, http2)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                              keepalive_expiry=60.0)
        transport = httpx.AsyncHTTPTransport(verify=verify, http2=http2, http1=True, limits=limits,
                                             local_address=self.settings.local_address)
        return httpx.AsyncClient(
            transport=transport, headers=self.headers,
            timeout=httpx.Timeout(connect=10.0, read=None, write=30.0, pool=10.0),
        )

    def stream_client(self, connections: int = 1) -> httpx.AsyncClient:
        """HTTP/1.1 connections of the caller's own to the channel's upstream (its trust,
        credentials and local address), for a download too big for :meth:`bulk_request`'s
        buffered answer (the updater streams a build); the caller closes it."""
        return self._client(False, connections=connections)

    async def _connect(self, url: str, backoff: Backoff) -> None:
        if self.settings.http2:
            try:
                conn = await H2Connection.open(url, shared_client_context(self.ca_pem, True), self.headers,
                                               self.settings.local_address)
            except NotH2:
                pass  # an HTTP/1.1-only server or middlebox: poll
            except H2Error as exc:
                raise Unreachable(str(exc)) from None
            else:
                try:
                    await self._h2_session(conn, url, backoff)
                finally:
                    conn.close()
                return
        async with self._client(False) as client:
            try:
                resp = await client.post(f"{url}/v1/handshake", json=self._hello(), timeout=30.0)
            except httpx.TransportError as exc:
                raise Unreachable(f"handshake with {url} failed: {_describe(exc)}") from None
            info = self._accept(resp, backoff)
            self.client, self.url, self.sid, self.mode = client, url, info["sid"], ChannelMode.POLL
            log.info("connected to %s by HTTP/1.1 polling", url)
            try:
                await self._poll(client, url, info["sid"])
            finally:
                self.client = self.url = self.sid = self.mode = None
                self.on_lost()

    def _hello(self) -> dict[str, Any]:
        return {"facts": self.facts(), "labels": self.labels, **self.hello_extra(), **self.hello_once}

    def retire(self) -> None:
        """Keep the current connection but make no new one (an agent handing over)."""
        self.retiring = True
        self._resume = anyio.Event()

    def resume(self) -> None:
        """Connect again as usual (a handover that fell through)."""
        self.retiring = False
        self._resume.set()

    def finish(self) -> None:
        """End the uplink stream once the outbox is sent (an agent that hands over, last)."""
        self._finish.set()
        self.wake().set()

    def reconnect(self, reason: str) -> None:
        """Drop the current connection; the channel handshakes again after its backoff."""
        if self.conn is not None:
            self.conn.fail(reason)
        elif self.client is not None:
            self._drop = reason  # the poll loop notices within one poll

    def _accept(self, resp: httpx.Response | Response, backoff: Backoff) -> dict[str, Any]:
        """Check a handshake's answer and adopt the master's timing."""
        if resp.status_code in (401, 403):
            raise Rejected(error_message(resp))
        if resp.status_code != 200:
            message = f"handshake answered {resp.status_code}: {error_message(resp)}"
            if resp.status_code in (409, 429, 503):
                raise Busy(message, busy_hint(resp.status_code, _json_or_none(resp), resp.headers))
            raise ChannelLost(message)
        info: dict[str, Any] = resp.json()
        self.max_frame = int(info.get("max_frame") or DEFAULT_MAX_FRAME)
        # the master's expectations win: beat at least as often as it wants, and allow its
        # heartbeats to be late before calling the channel dead
        master_hb = float(info.get("heartbeat") or self.settings.heartbeat)
        self.heartbeat = min(self.settings.heartbeat, master_hb / 2)
        self.dead_after = max(self.settings.dead_after, 2 * master_hb + 1)
        self.idle_beat = float(info.get("idle_beat") or self.heartbeat)
        self.fold = info.get("fold") is True
        self.poll_timeout = float(info.get("poll_wait") or 2) + self.dead_after
        backoff.reset()
        self.connects += 1
        self.hello_once = {}
        self.on_connected()
        return info

    async def request(self, method: str, path: str, content: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float = 30.0) -> httpx.Response | Response:
        """A request on the live connection (a proxy forwards handshakes this way)."""
        try:
            if self.conn is not None:
                return await self.conn.request(method, path, content=content, headers=headers, timeout=timeout)
            if self.client is not None and self.url is not None:
                return await self.client.request(method, f"{self.url}{path}", content=content, headers=headers,
                                                 timeout=timeout)
        except H2Error as exc:
            raise ChannelLost(str(exc)) from None
        raise ChannelLost("not connected upstream")

    async def bulk_request(self, method: str, path: str, timeout: float = 60.0) -> httpx.Response | Response:
        """A bulk transfer (a release chunk, a build) on HTTP/1.1 connections of its own beside
        the channel's. On the channel's HTTP/2 connection megabytes queued ahead of the PINGs
        delayed their answers, and on a thin link shared by many clients past the far end's
        patience, which then closed the connection (an HTTP/2 connection of its own only moved
        the problem there). HTTP/1.1 has no PINGs: a transfer that still moves is never cut, and
        one that stalls ends when ``timeout`` seconds pass without a byte. Same URL, credentials
        and session. When the channel polls, or no new connection can be made just now, the
        channel's own connection carries it."""
        url = self.url
        if self.conn is None or url is None:
            return await self.request(method, path, timeout=timeout)
        if self._bulk is None:
            self._bulk = self._client(False, connections=BULK_CONNECTIONS)
        try:
            return await self._bulk.request(method, f"{url}{path}",
                                            timeout=httpx.Timeout(connect=10.0, read=timeout, write=30.0, pool=None))
        except httpx.ConnectError as exc:  # no new connection now: the channel's own still can carry it
            log.info("no connection to %s for a bulk transfer (%s): using the channel's", url, repr(exc))
            return await self.request(method, path, timeout=timeout)
        except httpx.HTTPError as exc:
            raise ChannelLost(f"bulk transfer from {url} failed: {exc or type(exc).__name__}") from None

    async def _close_bulk(self) -> None:
        bulk, self._bulk = self._bulk, None
        if bulk is not None:
            with anyio.CancelScope(shield=True):
                await bulk.aclose()

    # -- HTTP/2 -------------------------------------------------------------------------------
    async def _h2_session(self, conn: H2Connection, url: str, backoff: Backoff) -> None:
        try:
            resp = await conn.request("POST", "/v1/handshake", json_body=self._hello(), timeout=30.0)
        except H2Error as exc:
            raise Unreachable(f"handshake failed: {exc}") from None
        info = self._accept(resp, backoff)
        self.conn, self.url, self.sid, self.mode = conn, url, info["sid"], ChannelMode.H2
        log.info("connected to %s over HTTP/2", url)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._h2_down, conn, info["sid"])
                tg.start_soon(self._h2_up, conn, info["sid"])
                tg.start_soon(self._h2_liveness, conn)
        finally:
            self.conn = None
            self.url = self.sid = self.mode = None
            await self._close_bulk()
            self.on_lost()

    async def _h2_down(self, conn: H2Connection, sid: str) -> None:
        decoder = FrameDecoder(self.max_frame, allowed=DOWN_TYPES)

        def on_data(chunk: bytes) -> None:
            try:
                for msg in decoder.feed(chunk):
                    self.on_message(msg)
            except Exception as exc:  # a bad frame, or a handler bug: start the connection over
                log.exception("downlink message could not be handled")
                conn.fail(f"downlink: {type(exc).__name__}: {exc}")

        stream = conn.start("GET", f"/v1/channel/down?sid={sid}", end_stream=True, on_data=on_data)
        try:
            status = await conn.answered(stream)
            if status != 200:
                raise ChannelLost(f"downlink answered {status}: {error_message(await conn.response(stream))}")
            await conn.ended(stream)
        except H2Error as exc:
            raise ChannelLost(f"downlink: {exc}") from None
        raise ChannelLost("master closed the downlink")

    async def _h2_up(self, conn: H2Connection, sid: str) -> None:
        stream = conn.start("POST", f"/v1/channel/up?sid={sid}", headers={"content-type": "application/x-zy-frames"})

        async def answered() -> None:
            resp = await conn.response(stream)
            raise ChannelLost(f"uplink ended with {resp.status_code}: {error_message(resp)}")

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(answered)
                async for data in self._frames(self.idle_beat):
                    await conn.send(stream, data)
                await conn.send(stream, b"", end_stream=True)
        except H2Error as exc:
            raise ChannelLost(f"uplink: {exc}") from None

    async def _frames(self, beat: float) -> AsyncIterator[bytes]:
        last_id = 0
        hb = Heartbeat(uuid=self.uuid).encode()
        while True:
            wake = self.wake()
            rows = self.outbox(last_id)
            if rows:
                last_id = rows[-1][0]
                yield b"".join(frame for _, frame in rows)
                continue
            if self._finish.is_set():
                return
            with anyio.move_on_after(beat) as idle:
                await wake.wait()
            if idle.cancelled_caught:
                yield hb

    async def _h2_liveness(self, conn: H2Connection) -> None:
        """HTTP/2 PING when the connection has been quiet for a ping interval: the server
        answers below the application, so liveness costs the master no Python work. The
        master pings too; either side's ping resets the other's silence, so an idle channel
        sees about one ping per interval. Wakes only when something is due (10,000 agents in
        one swarm process make per-second polling expensive)."""
        interval = 2 * self.heartbeat  # the master's own ping interval
        last_ping = 0.0
        while not conn.closed.is_set():
            now = time.monotonic()
            silent = now - conn.last_rx
            if silent > self.dead_after:
                raise ChannelLost(f"nothing from the master for {silent:.0f}s")
            if silent >= interval and now - last_ping >= interval:
                conn.ping()
                last_ping = now
            next_ping = max(conn.last_rx, last_ping) + interval
            deadline = conn.last_rx + self.dead_after
            await anyio.sleep(max(0.05, min(next_ping, deadline) - now))
        raise ChannelLost(conn.close_reason)

    # -- HTTP/1.1 polling ---------------------------------------------------------------------
    async def _poll(self, client: httpx.AsyncClient, url: str, sid: str) -> None:
        async with anyio.create_task_group() as tg:
            if self.settings.http2:
                tg.start_soon(self._probe_h2, url)
            await self._poll_loop(client, url, sid)

    async def _poll_loop(self, client: httpx.AsyncClient, url: str, sid: str) -> None:
        """Two request loops over HTTP/1.1: one held poll for what the master sends, and
        uplink-only posts as soon as there is something to send, so results never wait for
        the held poll to come back."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._poll_up, client, url, sid)
            await self._poll_down(client, url, sid)

    async def _post_poll(self, client: httpx.AsyncClient, url: str, params: dict[str, str],
                         body: bytes) -> httpx.Response:
        resp = await client.post(f"{url}/v1/channel/poll", params=params, content=body,
                                 headers={"content-type": "application/x-zy-frames"}, timeout=self.poll_timeout)
        if resp.status_code != 200:
            raise ChannelLost(f"poll answered {resp.status_code}: {error_message(resp)}")
        return resp

    async def _poll_down(self, client: httpx.AsyncClient, url: str, sid: str) -> None:
        decoder = FrameDecoder(self.max_frame, allowed=DOWN_TYPES)
        hb = Heartbeat(uuid=self.uuid).encode()
        while True:
            if self._drop:
                reason, self._drop = self._drop, None
                raise ChannelLost(reason)
            resp = await self._post_poll(client, url, {"sid": sid}, hb)
            for msg in decoder.feed(resp.content):
                self.on_message(msg)

    async def _poll_up(self, client: httpx.AsyncClient, url: str, sid: str) -> None:
        last_id = 0
        while True:
            wake = self.wake()
            rows = self.outbox(last_id)
            if not rows:
                await wake.wait()
                continue
            await self._post_poll(client, url, {"sid": sid, "mode": "up"}, b"".join(f for _, f in rows))
            last_id = rows[-1][0]

    async def _probe_h2(self, url: str) -> None:
        while True:
            await anyio.sleep(self.settings.h2_retry)
            try:
                async with self._client(True) as probe:
                    resp = await probe.get(f"{url}/v1/ca")
                if resp.http_version == "HTTP/2":
                    raise SwitchToH2()
            except httpx.HTTPError:
                pass


def _json_or_none(resp: httpx.Response | Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = next((e for e in exc.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())),
                   exc.exceptions[0])
    return exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
