"""A lean HTTP/2 client connection for the channel: the handshake, the two long-lived streams
and the odd forwarded request, all on one TLS connection.

Why not httpx here: a channel carries many small messages for a long time, and httpx/httpcore
spends several awaits, locks and checkpoints on each one. This is an asyncio protocol driving
the ``h2`` state machine directly: a downlink chunk goes from ``data_received`` to the
channel's frame decoder with no await in between. Liveness is HTTP/2 PING: the master (hyper,
in granian) answers it without Python, so an idle channel costs the master nothing.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

WINDOW = 4 * 1024 * 1024  # what the master may send before the channel has read it


class H2Error(Exception):
    """The connection or a stream failed; the channel reconnects."""


class NotH2(H2Error):
    """The server (or a middlebox) did not agree to HTTP/2: use HTTP/1.1 polling."""


@dataclass
class Response:
    """A finished request's answer, shaped like the parts of ``httpx.Response`` callers use."""

    status_code: int
    headers: dict[str, str]
    content: bytes
    http_version: str = "HTTP/2"

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass(eq=False)
class _Stream:
    on_data: Callable[[bytes], None] | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    error: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    window: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, reason: str) -> None:
        self.error = self.error or reason
        self.answered.set()
        self.ended.set()
        self.window.set()


class H2Connection(asyncio.Protocol):
    def __init__(self, authority: str, headers: dict[str, str]) -> None:
        self.authority = authority.encode()
        self.base_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = asyncio.Event()
        self.close_reason = "connection closed"
        self.last_rx = time.monotonic()
        self._writable = asyncio.Event()
        self._writable.set()
        self._conn_window = asyncio.Event()
        self._slot = asyncio.Event()  # set when a stream closes: room under the peer's stream limit

    @classmethod
    async def open(cls, url: str, ctx: ssl.SSLContext, headers: dict[str, str], local_address: str | None = None,
                   timeout: float = 10.0) -> H2Connection:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        conn = cls(parts.netloc, headers)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: conn, host, port, ssl=ctx, server_hostname=host,
                local_addr=(local_address, 0) if local_address else None), timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise H2Error(f"cannot connect to {parts.netloc}: {exc or type(exc).__name__}") from None
        assert conn.transport is not None
        ssl_object = conn.transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            conn.close()
            raise NotH2(f"{parts.netloc} does not speak HTTP/2")
        return conn

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 16,
        })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._lost(f"HTTP/2 protocol error: {exc}")
            return
        for event in events:
            self._handle(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "connection closed by the server")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- events -------------------------------------------------------------------------------
    def _handle(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream is not None:
                if stream.on_data is not None and stream.status == 200:
                    stream.on_data(event.data)
                else:
                    stream.body.append(event.data)
        elif isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            stream.status = int(stream.headers.get(":status", "0"))
            stream.answered.set()
        elif isinstance(event, h2.events.StreamEnded):
            self._slot.set()
            if stream is not None:
                stream.answered.set()
                stream.ended.set()
        elif isinstance(event, h2.events.StreamReset):
            self._slot.set()
            if stream is not None:
                stream.fail(f"stream reset by the server (error {event.error_code})")
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                self._conn_window.set()
            elif stream is not None:
                stream.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._lost(f"the server ended the connection (GOAWAY, error {event.error_code})")

    def fail(self, reason: str) -> None:
        """Abort the connection: every stream ends with ``reason``."""
        self._lost(reason)

    def _lost(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self._slot.set()
        self._writable.set()
        self._conn_window.set()
        for stream in self.streams.values():
            stream.fail(reason)
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _check(self) -> None:
        if self.closed.is_set():
            raise H2Error(self.close_reason)

    # -- requests -----------------------------------------------------------------------------
    def start(self, method: str, path: str, headers: dict[str, str] | None = None, end_stream: bool = False,
              on_data: Callable[[bytes], None] | None = None) -> int:
        """Open a stream; its response body goes to ``on_data`` as it arrives, or is kept."""
        self._check()
        stream_id = self.h2.get_next_available_stream_id()
        hdrs = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", self.authority),
                (b":path", path.encode()), *self.base_headers,
                *[(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]]
        self.streams[stream_id] = _Stream(on_data=on_data)
        self.h2.send_headers(stream_id, hdrs, end_stream=end_stream)
        self._flush()
        return stream_id

    async def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send body bytes within the flow-control windows, waiting while they are shut."""
        stream = self.streams[stream_id]
        view = memoryview(data)
        while view or end_stream:
            self._check()
            if stream.error:
                raise H2Error(stream.error)
            if not self._writable.is_set():
                await self._writable.wait()
                continue
            if not view:
                self.h2.end_stream(stream_id)
                self._flush()
                return
            size = min(len(view), self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if size <= 0:
                await self._wait_window(stream)
                continue
            self.h2.send_data(stream_id, view[:size].tobytes(), end_stream=end_stream and size == len(view))
            self._flush()
            if end_stream and size == len(view):
                return
            view = view[size:]

    async def _wait_window(self, stream: _Stream) -> None:
        stream.window.clear()
        self._conn_window.clear()
        waits = [asyncio.ensure_future(stream.window.wait()), asyncio.ensure_future(self._conn_window.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def response(self, stream_id: int) -> Response:
        """The whole answer of a stream (waits for its end)."""
        stream = self.streams[stream_id]
        try:
            await stream.ended.wait()
            if stream.error:
                raise H2Error(stream.error)
            return Response(stream.status or 0, stream.headers, b"".join(stream.body))
        finally:
            self.streams.pop(stream_id, None)

    async def answered(self, stream_id: int) -> int:
        """The status of a stream's response, once its headers have arrived."""
        stream = self.streams[stream_id]
        await stream.answered.wait()
        if stream.error:
            raise H2Error(stream.error)
        return stream.status or 0

    async def ended(self, stream_id: int) -> None:
        stream = self.streams[stream_id]
        await stream.ended.wait()
        if stream.error:
            raise H2Error(stream.error)

    async def request(self, method: str, path: str, content: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float = 30.0, json_body: Any = None) -> Response:
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        stream_id = 0
        try:
            async with asyncio.timeout(timeout):
                await self._stream_slot()
                stream_id = self.start(method, path, headers, end_stream=not content)
                if content:
                    await self.send(stream_id, content, end_stream=True)
                return await self.response(stream_id)
        except TimeoutError:
            if stream_id:
                self._abandon(stream_id)
            raise H2Error(f"{method} {path}: no answer within {timeout:g}s") from None

    def _abandon(self, stream_id: int) -> None:
        """Reset a stream we stopped waiting for, so it frees its slot on both sides."""
        self.streams.pop(stream_id, None)
        try:
            self.h2.reset_stream(stream_id)
            self._flush()
        except h2.exceptions.H2Error:
            pass  # already closed

    async def _stream_slot(self) -> None:
        """Wait for room under the server's concurrent-stream limit (a proxy forwarding a
        reconnect storm's handshakes has hundreds in flight on its one connection)."""
        while self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams:
            self._check()
            self._slot.clear()
            await self._slot.wait()

    def ping(self) -> None:
        if not self.closed.is_set():
            self.h2.ping(time.monotonic_ns().to_bytes(8, "big"))
            self._flush()

    def close(self) -> None:
        if self.transport is not None and not self.closed.is_set():
            try:
                self.h2.close_connection()
                self._flush()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()
        self._lost("closed by us")
