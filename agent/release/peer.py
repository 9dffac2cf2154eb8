"""Agents share release chunks with agents near them (P2P within a cluster).

Each agent that has fetched a release serves its chunks over plain HTTP on ``--peer-port``
(``GET /chunk/SHA?t=TOKEN``), read from its release files (:mod:`agent.release.chunkstore`). What travels
is checked by the receiver against the signed manifest, so integrity never rests on the peer;
the token keeps strangers on the LAN from pulling release content. It is ``EXP.NONCE.MAC``: an
expiry (unix seconds, ``TOKEN_TTL`` ahead), a random nonce and the HMAC of chunk, expiry and
nonce under the release's peer key (only agents given that release hold it). A server takes a
token once, and only until its expiry (``CLOCK_SKEW`` allowed between hosts' clocks), so one
read off the LAN is worthless: already spent, and dead within two minutes anyway.

Limits: ``uploads`` concurrent transfers, and ``rate`` bytes a second in all (0: no cap);
``MAX_CONNECTIONS`` connections, ``PER_ADDRESS`` of them from one source address, and
``HEAD_DEADLINE`` seconds to send the request line. When every place is taken the connection
waiting longest for its request gives its place up to the new one, so idle sockets cannot keep
an honest peer out. An agent that cannot accept connections simply never gets asked: it still
downloads from its proxy.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc

from .chunkstore import ChunkStore

log = logging.getLogger("zy.agent.peer")
_REQUEST = re.compile(rb"^GET /chunk/([0-9a-f]{64})\?t=([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64}) HTTP/1\.[01]\r\n")
#: a token as agents before expiring tokens sent it (HMAC of the chunk alone: replayable for ever)
_OLD_REQUEST = re.compile(rb"^GET /chunk/[0-9a-f]{64}\?t=[0-9a-f]{64} HTTP/1\.[01]\r\n")
MAX_HEAD = 8192
#: seconds a token is good for once made
TOKEN_TTL = 60
#: how far two agents' clocks may disagree: a token is taken until EXP + this
CLOCK_SKEW = 60
#: seconds a connection has to send its whole request head
HEAD_DEADLINE = 5.0
#: seconds a transfer may take once the request is in (a stalled reader does not hold a slot for ever)
TRANSFER_DEADLINE = 60.0
MAX_CONNECTIONS = 64
#: connections from one source address (a host fetches a few chunks at a time from one peer)
PER_ADDRESS = 16
#: spent tokens remembered (until they expire) at most; past that, requests wait for room (429)
MAX_SPENT = 100_000


def token(key: str, sha: str, now: float | None = None) -> str:
    """A fresh token for chunk ``sha`` under the release's peer key: good once, for TOKEN_TTL s."""
    exp = int(time.time() if now is None else now) + TOKEN_TTL
    nonce = secrets.token_hex(16)
    return f"{exp}.{nonce}.{_mac(key, sha, exp, nonce)}"


def _mac(key: str, sha: str, exp: int, nonce: str) -> str:
    return hmac.new(bytes.fromhex(key), f"zy-peer-1|{sha}|{exp}|{nonce}".encode(), hashlib.sha256).hexdigest()


class Tokens:
    """Checks tokens and remembers the spent ones until they expire (a replay is refused)."""

    def __init__(self, most: int = MAX_SPENT) -> None:
        self.keys: set[str] = set()
        self.most = most
        self._spent: dict[str, float] = {}  # nonce -> when it may be forgotten
        self._swept = time.time()

    def refusal(self, sha: str, exp: int, nonce: str, mac: str, now: float | None = None) -> tuple[int, str] | None:
        """Why a token is refused (status, reason), or None once it is taken (and spent)."""
        now = time.time() if now is None else now
        if exp < now - CLOCK_SKEW:
            return 403, "token expired"
        if exp > now + TOKEN_TTL + CLOCK_SKEW:
            return 403, "token expires too far ahead"
        if not any(hmac.compare_digest(mac, _mac(k, sha, exp, nonce)) for k in self.keys):
            return 403, "not a peer of this release"
        self._sweep(now)
        if nonce in self._spent:
            return 403, "token already used"
        if len(self._spent) >= self.most:
            return 429, "too many requests"
        self._spent[nonce] = exp + CLOCK_SKEW
        return None

    def _sweep(self, now: float) -> None:
        if len(self._spent) >= self.most or now - self._swept > TOKEN_TTL:
            self._spent = {n: until for n, until in self._spent.items() if until >= now}
            self._swept = now


@dataclass(frozen=True, kw_only=True)
class PeerSettings:
    port: int = 0
    uploads: int = 4
    rate: float = 0


class RateLimit:
    """A token bucket shared by every transfer that goes through it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._allowance = rate
        self._at = time.monotonic()
        self._lock = anyio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            now = time.monotonic()
            self._allowance = min(self.rate, self._allowance + (now - self._at) * self.rate)
            self._at = now
            self._allowance -= n
            if self._allowance < 0:
                await anyio.sleep(-self._allowance / self.rate)


class _Conn:
    """A connection's place: by its address, and (until its request is in) among those waiting."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.scope = anyio.CancelScope()
        self.released = False


class PeerServer:
    def __init__(self, chunks: ChunkStore, port: int = 0, host: str = "0.0.0.0", uploads: int = 4,
                 rate: float = 0, max_connections: int = MAX_CONNECTIONS, per_address: int = PER_ADDRESS) -> None:
        self.chunks = chunks
        self.port = port
        self.host = host
        self.tokens = Tokens()
        self.keys = self.tokens.keys  # the releases' peer keys, added as releases are fetched
        self.uploads = uploads
        self.slots = anyio.Semaphore(uploads)
        self.max_connections = max_connections
        self.per_address = per_address
        self._open = 0
        self._by_address: dict[str, int] = {}
        self._waiting: dict[_Conn, None] = {}  # oldest first: connections yet to send their request
        self.limit = RateLimit(rate)
        self.served = {"requests": 0, "bytes": 0, "refused": 0, "busy": 0, "turned_away": 0, "evicted": 0}

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            listener = socket.create_server((self.host, self.port), backlog=256)
        except OSError as exc:  # the port is taken: this agent takes from peers but serves nobody
            log.error("cannot serve chunks to peers on port %d: %s", self.port, exc)
            task_status.started(0)
            return
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        log.info("serving release chunks to peers on port %d", self.port)
        task_status.started(self.port)
        with listener:
            async with anyio.create_task_group() as tg:
                while True:
                    await anyio.wait_readable(listener)
                    try:
                        conn, peer = listener.accept()
                    except BlockingIOError:
                        continue
                    except OSError as exc:  # out of descriptors, say: wait, do not take the agent down
                        log.warning("peer server: accept failed (%s)", exc)
                        await anyio.sleep(1)
                        continue
                    conn.setblocking(False)
                    tg.start_soon(self._handle, conn, str(peer[0]))

    async def _handle(self, conn: socket.socket, address: str) -> None:
        with conn:
            place = self._admit(address)
            if place is None:
                _say(conn, 429, b"too many connections from your address")  # hold nothing
                return
            try:
                with place.scope:
                    with anyio.fail_after(HEAD_DEADLINE):  # an idle socket is let go within seconds
                        head, _ = await _read_head(conn)
                    self._waiting.pop(place, None)
                    with anyio.fail_after(TRANSFER_DEADLINE):
                        await self._serve_one(conn, head)
            except (TimeoutError, OSError, ValueError):
                pass
            finally:
                self._release(place)

    def _admit(self, address: str) -> _Conn | None:
        """A place for a new connection from ``address``, or None. When every place (or every
        place of that address) is taken, the connection that has waited longest without sending
        its request gives its place up: idle sockets never keep out a peer that asks at once,
        even one on the same host as the idler."""
        full = self._by_address.get(address, 0) >= self.per_address
        if (full or self._open >= self.max_connections) and not self._evict(address if full else None):
            self.served["turned_away"] += 1  # every place is a transfer under way
            return None
        place = _Conn(address)
        self._open += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1
        self._waiting[place] = None
        return place

    def _evict(self, address: str | None) -> bool:
        """End the oldest connection still waiting for its request (from ``address`` only, if
        given); whether there was one."""
        oldest = next((c for c in self._waiting if address is None or c.address == address), None)
        if oldest is None:
            return False
        oldest.scope.cancel()
        self._release(oldest)
        self.served["evicted"] += 1
        return True

    def _release(self, place: _Conn) -> None:
        if place.released:
            return
        place.released = True
        self._waiting.pop(place, None)
        self._open -= 1
        left = self._by_address[place.address] - 1
        if left:
            self._by_address[place.address] = left
        else:
            del self._by_address[place.address]

    async def _serve_one(self, conn: socket.socket, head: bytes) -> None:
        match = _REQUEST.match(head)
        if match is None:
            old = _OLD_REQUEST.match(head) is not None
            self.served["refused"] += old
            await _reply(conn, 403 if old else 400, b"a token without an expiry is refused (update the requesting "
                         b"agent)" if old else b"bad request")
            return
        sha, exp, nonce, mac = (g.decode() for g in match.groups())
        self.served["requests"] += 1
        refused = self.tokens.refusal(sha, int(exp), nonce, mac)
        if refused is not None:
            self.served["refused"] += 1
            await _reply(conn, refused[0], refused[1].encode())
            return
        if self.slots.value == 0:
            self.served["busy"] += 1
            await _reply(conn, 429, b"too many uploads")
            return
        async with self.slots:  # for the whole transfer: the limit bounds uploads, not file reads
            at = await anyio.to_thread.run_sync(self.chunks.locate, sha)
            fh = await anyio.to_thread.run_sync(_open_or_none, at[0]) if at is not None else None
            if at is None or fh is None:
                await _reply(conn, 404, b"no such chunk here")
                return
            with fh:
                _, offset, length = at
                await _send_all(conn, b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % length)
                await self._send_file(conn, fh.fileno(), offset, length)
            self.served["bytes"] += length

    async def _send_file(self, conn: socket.socket, fd: int, offset: int, length: int) -> None:
        """The chunk straight from the release file to the socket (sendfile: no copy through
        Python), paced by the upload rate cap."""
        end = offset + length
        while offset < end:
            piece = min(end - offset, 256 * 1024 if self.limit.rate > 0 else end - offset)
            await self.limit.take(piece)
            piece_end = offset + piece
            while offset < piece_end:
                try:
                    sent = os.sendfile(conn.fileno(), fd, offset, piece_end - offset)
                except BlockingIOError:
                    await anyio.wait_writable(conn)
                    continue
                if sent == 0:
                    raise OSError("the chunk's file ended early")
                offset += sent


def _open_or_none(path: Path) -> IO[bytes] | None:
    try:
        return open(path, "rb")
    except OSError:
        return None


async def _reply(conn: socket.socket, status: int, body: bytes) -> None:
    await _send_all(conn, b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (status, len(body), body))


def _say(conn: socket.socket, status: int, body: bytes) -> None:
    """A short answer, sent only if it fits the socket's buffer now (never waits)."""
    try:
        conn.send(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(body), body))
    except OSError:
        pass


async def _send_all(conn: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view):]
        except BlockingIOError:
            await anyio.wait_writable(conn)


async def _recv_into(conn: socket.socket, view: memoryview) -> int:
    while True:
        try:
            return conn.recv_into(view)
        except BlockingIOError:
            await anyio.wait_readable(conn)


async def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """The head of an HTTP message, and whatever came after it in the same reads."""
    head = bytearray()
    buf = memoryview(bytearray(MAX_HEAD))
    while b"\r\n\r\n" not in head:
        n = await _recv_into(conn, buf)
        if n == 0:
            raise ValueError("connection closed before the head ended")
        head += buf[:n]
        if len(head) > 2 * MAX_HEAD:
            raise ValueError("head too large")
    top, _, rest = bytes(head).partition(b"\r\n\r\n")
    return top + b"\r\n\r\n", rest


async def fetch_from_peer(address: str, sha: str, key: str, into: memoryview, timeout: float = 30) -> memoryview:
    """One chunk from a peer (``host:port``), read straight into ``into`` (its length is the
    chunk's); raises OSError, ValueError or TimeoutError when it cannot (a dead peer costs
    seconds, not the whole timeout)."""
    size = len(into)
    host, _, port = address.rpartition(":")
    family, _, _, _, sockaddr = (await anyio.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM))[0]
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.setblocking(False)
        with anyio.fail_after(5):
            await _connect(conn, sockaddr)
        with anyio.fail_after(timeout):
            await _send_all(conn, f"GET /chunk/{sha}?t={token(key, sha)} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
            head, rest = await _read_head(conn)
            status, length = _response(head, address)
            if status != 200:
                raise ValueError(f"peer {address} answered {status}: {rest[:100]!r}")
            if length != size:
                raise ValueError(f"peer {address} offers {length} bytes for a chunk of {size}")
            got = min(len(rest), size)
            into[:got] = rest[:got]
            while got < size:
                n = await _recv_into(conn, into[got:])
                if n == 0:
                    raise ValueError(f"peer {address} closed after {got} of {size} bytes")
                got += n
    return into


async def _connect(conn: socket.socket, sockaddr: Any) -> None:
    err = conn.connect_ex(sockaddr)
    if err not in (0, errno.EINPROGRESS):
        raise OSError(err, os.strerror(err))
    await anyio.wait_writable(conn)
    err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _response(head: bytes, address: str) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    try:
        status = int(parts[1])
        length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
    except (IndexError, ValueError, StopIteration):
        raise ValueError(f"peer {address} sent a malformed answer") from None
    return status, length
