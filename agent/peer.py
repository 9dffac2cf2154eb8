"""Agents share release chunks with agents near them (P2P within a cluster).

Each agent that has fetched a release serves its chunks over plain HTTP on ``--peer-port``
(``GET /chunk/SHA?t=TOKEN``). What travels is checked by the receiver against the signed
manifest, so integrity never rests on the peer; the token (HMAC of the chunk's hash under the
release's peer key, which only agents given that release hold) keeps strangers on the LAN from
pulling release content. Limits: ``uploads`` concurrent transfers, and ``rate`` bytes a second
in all (0: no cap). An agent that cannot accept connections simply never gets asked: it still
downloads from its proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import SocketStream

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
    def __init__(self, chunks: Path, port: int = 0, host: str = "0.0.0.0", uploads: int = 4,
                 rate: float = 0) -> None:
        self.chunks = chunks
        self.port = port
        self.host = host
        self.keys: set[str] = set()
        self.slots = anyio.Semaphore(uploads)
        self.connections = anyio.Semaphore(64)
        self.limit = RateLimit(rate)
        self.served = {"requests": 0, "bytes": 0, "refused": 0, "busy": 0}

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port, reuse_port=False)
        except OSError as exc:  # the port is taken: this agent takes from peers but serves nobody
            log.error("cannot serve chunks to peers on port %d: %s", self.port, exc)
            task_status.started(0)
            return
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("serving release chunks to peers on port %d", self.port)
        task_status.started(self.port)
        sock = listener.listeners[0]  # one address: 0.0.0.0
        assert isinstance(sock, anyio.abc.SocketListener)
        async with listener, anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await sock.accept()
                except OSError as exc:  # out of descriptors, say: wait, do not take the agent down
                    log.warning("peer server: accept failed (%s)", exc)
                    await anyio.sleep(1)
                    continue
                tg.start_soon(self._handle, stream)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            if self.connections.value == 0:
                return  # more connections than we serve: drop at once, hold nothing
            async with self.connections:
                try:
                    with anyio.fail_after(60):  # a stalled reader does not hold a slot for ever
                        await self._serve_one(stream, await _read_head(stream))
                except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError, ValueError):
                    pass

    async def _serve_one(self, stream: SocketStream, head: bytes) -> None:
        match = _REQUEST.match(head)
        if match is None:
            await _reply(stream, 400, b"bad request")
            return
        sha, tok = match.group(1).decode(), match.group(2).decode()
        self.served["requests"] += 1
        if not any(hmac.compare_digest(tok, token(k, sha)) for k in self.keys):
            self.served["refused"] += 1
            await _reply(stream, 403, b"not a peer of this release")
            return
        if self.slots.value == 0:
            self.served["busy"] += 1
            await _reply(stream, 429, b"too many uploads")
            return
        async with self.slots:  # for the whole transfer: the limit bounds uploads, not file reads
            try:
                body = await anyio.Path(self.chunks / sha).read_bytes()
            except OSError:
                await _reply(stream, 404, b"no such chunk here")
                return
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
            for i in range(0, len(body), 256 * 1024):
                piece = body[i:i + 256 * 1024]
                await self.limit.take(len(piece))
                await stream.send(piece)
            self.served["bytes"] += len(body)


async def _reply(stream: SocketStream, status: int, body: bytes) -> None:
    await stream.send(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(body), body))


async def _read_head(stream: SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive(4096)
        if len(head) > MAX_HEAD:
            raise ValueError("request head too large")
    return head


async def fetch_from_peer(address: str, sha: str, key: str, size: int, timeout: float = 30) -> bytes:
    """One chunk of ``size`` bytes from a peer (``host:port``); raises OSError, ValueError or
    TimeoutError when it cannot (a dead peer costs seconds, not the whole timeout)."""
    host, _, port = address.rpartition(":")
    with anyio.fail_after(5):
        stream = await anyio.connect_tcp(host, int(port))
    async with stream:
        with anyio.fail_after(timeout):
            await stream.send(f"GET /chunk/{sha}?t={token(key, sha)} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
            head = await _read_head(stream)
            status, length, body = _response(head, address)
            if status != 200:
                raise ValueError(f"peer {address} answered {status}: {bytes(body[:100])!r}")
            if length != size:
                raise ValueError(f"peer {address} offers {length} bytes for a chunk of {size}")
            while len(body) < size:
                body += await stream.receive(min(1024 * 1024, size - len(body)))
    return bytes(body[:size])


def _response(head: bytes, address: str) -> tuple[int, int, bytearray]:
    top, _, rest = head.partition(b"\r\n\r\n")
    lines = top.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    try:
        status = int(parts[1])
        length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
    except (IndexError, ValueError, StopIteration):
        raise ValueError(f"peer {address} sent a malformed answer") from None
    return status, length, bytearray(rest)
