"""Agents share release chunks with agents near them (P2P within a cluster).

Each agent that has fetched a release serves its chunks over plain HTTP on ``--peer-port``
(``GET /chunk/SHA?t=TOKEN``), read from its release files (:mod:`agent.chunkstore`). What travels
is checked by the receiver against the signed manifest, so integrity never rests on the peer;
the token (HMAC of the chunk's hash under the release's peer key, which only agents given that
release hold) keeps strangers on the LAN from pulling release content. Limits: ``uploads``
concurrent transfers, and ``rate`` bytes a second in all (0: no cap). An agent that cannot
accept connections simply never gets asked: it still downloads from its proxy.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc

from .chunkstore import ChunkStore

log = logging.getLogger("zy.agent.peer")
_REQUEST = re.compile(rb"^GET /chunk/([0-9a-f]{64})\?t=([0-9a-f]{64}) HTTP/1\.[01]\r\n")
MAX_HEAD = 8192


def token(key: str, sha: str) -> str:
    return hmac.new(bytes.fromhex(key), sha.encode(), hashlib.sha256).hexdigest()


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


class PeerServer:
    def __init__(self, chunks: ChunkStore, port: int = 0, host: str = "0.0.0.0", uploads: int = 4,
                 rate: float = 0) -> None:
        self.chunks = chunks
        self.port = port
        self.host = host
        self.keys: set[str] = set()
        self.uploads = uploads
        self.slots = anyio.Semaphore(uploads)
        self.connections = anyio.Semaphore(64)
        self.limit = RateLimit(rate)
        self.served = {"requests": 0, "bytes": 0, "refused": 0, "busy": 0}

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
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    except OSError as exc:  # out of descriptors, say: wait, do not take the agent down
                        log.warning("peer server: accept failed (%s)", exc)
                        await anyio.sleep(1)
                        continue
                    conn.setblocking(False)
                    tg.start_soon(self._handle, conn)

    async def _handle(self, conn: socket.socket) -> None:
        with conn:
            if self.connections.value == 0:
                return  # more connections than we serve: drop at once, hold nothing
            async with self.connections:
                try:
                    with anyio.fail_after(60):  # a stalled reader does not hold a slot for ever
                        head, _ = await _read_head(conn)
                        await self._serve_one(conn, head)
                except (TimeoutError, OSError, ValueError):
                    pass

    async def _serve_one(self, conn: socket.socket, head: bytes) -> None:
        match = _REQUEST.match(head)
        if match is None:
            await _reply(conn, 400, b"bad request")
            return
        sha, tok = match.group(1).decode(), match.group(2).decode()
        self.served["requests"] += 1
        if not any(hmac.compare_digest(tok, token(k, sha)) for k in self.keys):
            self.served["refused"] += 1
            await _reply(conn, 403, b"not a peer of this release")
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
