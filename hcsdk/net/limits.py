"""Limits a service puts on what a client may hold of it before it has proved who it is:
bounded body reads with a deadline, per-address caps on requests still being checked, per-key
caps on concurrent work (downloads per credential, one handshake per uuid), and file responses
streamed from disk. Shared by master and proxy; raw ASGI, no framework.

Why at the ASGI level: granian only bounds how long HTTP/1 headers may take
(``HTTP1Settings.header_read_timeout``); bodies, HTTP/2 streams and how many requests one
address has in flight are the application's to bound.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

from hcsdk.net.asgi import BodyTimeout, BodyTooLarge, ClientGone, Receive, Scope, Send, error, header
from hcsdk.net.pacing import SHORT_RETRY
from hcsdk.net.reaper import REAPER_KEY

__all__ = ["AddressGate", "BodyTimeout", "KeyedSlots", "authenticated", "client_address", "declared_length",
           "read_limited", "send_file"]

#: the scope key under which AddressGate leaves the release of a request's place
_GATE_KEY = "zy.gate_release"


def client_address(scope: Scope) -> str:
    """The peer's address (granian fills ``scope["client"]``); '' when unknown."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def declared_length(scope: Scope) -> int | None:
    """The body size the client announced (Content-Length), if any and well formed."""
    value = header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


async def read_limited(receive: Receive, limit: int, timeout: float, scope: Scope | None = None) -> bytes:
    """The whole request body, refused once it passes ``limit`` bytes (BodyTooLarge, a 413) or
    when it has not all arrived within ``timeout`` seconds (BodyTimeout, a 408).

    A declared Content-Length over the limit is refused before any byte is read. The deadline is
    for the whole body, not per chunk: a sender trickling a byte a second must not hold a
    request (and what it has sent so far) open indefinitely."""
    if scope is not None and (declared_length(scope) or 0) > limit:
        raise BodyTooLarge(f"request body exceeds {limit} bytes")
    buf = bytearray()
    try:
        with anyio.fail_after(timeout):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise ClientGone()
                buf += msg.get("body", b"")
                if len(buf) > limit:
                    raise BodyTooLarge(f"request body exceeds {limit} bytes")
                if not msg.get("more_body"):
                    return bytes(buf)
    except TimeoutError:
        raise BodyTimeout(f"request body not received within {timeout:g}s") from None


class AddressGate:
    """At most ``limit`` requests per source address between arrival and authentication.

    Wrap an ASGI app with it; a handler calls :func:`authenticated` once the request's
    credential checks out, and from then on the request no longer counts. So a fleet behind
    one NAT address (or a proxy carrying many agents) keeps its long-lived channels, while an
    address that opens request after request without ever authenticating gets 429 beyond the
    limit. Requests that never authenticate (enrollment, public routes, refusals) count for
    their whole life. ``limit <= 0`` turns the gate off."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int,
                 total: int | None = None) -> None:
        self.app = app
        self.limit = limit
        #: all addresses together: an attacker with many addresses (an IPv6 prefix, a botnet)
        #: must not multiply the per-address share without bound
        self.total = 8 * limit if total is None else total
        self.pending: dict[str, int] = {}
        self.in_flight = 0
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0:
            await self.app(scope, receive, send)
            return
        addr = address_group(client_address(scope))
        if self.pending.get(addr, 0) >= self.limit:
            self.refused += 1
            await error(send, 429, f"too many unauthenticated requests in flight from {addr} "
                                   f"(at most {self.limit}); retry after a backoff", kind="busy",
                        retry_after=SHORT_RETRY)
            return
        # the total binds only requests that bring no credential at all (enrollments, the CA):
        # one with a credential is checked from its headers at once, and the SDK and agents
        # must keep getting in while the anonymous share is full
        anonymous = not any(k == b"authorization" for k, _ in scope["headers"])
        if anonymous and self.in_flight >= self.total > 0:
            self.refused += 1
            await error(send, 503, f"too many unauthenticated requests in flight (at most {self.total} from all "
                                   "addresses); retry after a backoff", kind="busy",
                        retry_after=SHORT_RETRY)
            return
        self.pending[addr] = self.pending.get(addr, 0) + 1
        self.in_flight += anonymous
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.in_flight -= anonymous
                left = self.pending[addr] - 1
                if left:
                    self.pending[addr] = left
                else:
                    del self.pending[addr]

        scope[_GATE_KEY] = release
        try:
            await self.app(scope, receive, send)
        finally:
            release()


def address_group(addr: str) -> str:
    """What one party is taken to hold: an IPv4 address, or an IPv6 /64 (one host or LAN gets a
    whole /64, so counting single IPv6 addresses would count nothing)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return addr


def authenticated(scope: Scope) -> None:
    """The request's credential checked out: it no longer counts against its address."""
    release = scope.pop(_GATE_KEY, None)
    if release is not None:
        release()
    mark = scope.get(REAPER_KEY)  # and its connection is never closed as idle (hcsdk.net.reaper)
    if mark is not None:
        mark(scope)


class KeyedSlots:
    """At most ``limit`` concurrent holders per key (a credential, a uuid); beyond, ``take``
    yields False at once instead of waiting, so the caller answers 409/429 and holds nothing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[str, int] = {}

    @contextmanager
    def take(self, key: str) -> Iterator[bool]:
        if self.held.get(key, 0) >= self.limit:
            yield False
            return
        self.held[key] = self.held.get(key, 0) + 1
        try:
            yield True
        finally:
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]


async def send_file(send: Send, path: Path, headers: list[tuple[bytes, bytes]] | None = None,
                    chunk: int = 256 * 1024, send_timeout: float | None = None) -> int:
    """Answer 200 with a file's bytes, read from disk a chunk at a time (off the event loop), so
    a download holds one chunk in memory however large the file. Returns the bytes sent.

    The size is taken from the open file, so a file replaced meanwhile (by rename) is still
    sent whole and consistent. Raises ClientGone when the client leaves mid-way, or when one
    chunk takes longer than ``send_timeout`` to leave (a reader that stopped reading)."""
    async with await anyio.open_file(path, "rb") as fh:
        size = os.fstat(fh.wrapped.fileno()).st_size
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(size).encode()), *(headers or [])]})
        sent = 0
        while sent < size:
            data = await fh.read(min(chunk, size - sent))
            if not data:  # truncated under us: end short rather than hang (the client's check fails)
                break
            sent += len(data)
            try:
                with anyio.fail_after(send_timeout):
                    await send({"type": "http.response.body", "body": data, "more_body": sent < size})
            except Exception as exc:  # granian raises when the peer is gone; TimeoutError when stalled
                raise ClientGone() from exc
        if sent < size:
            raise ClientGone()
        return sent
