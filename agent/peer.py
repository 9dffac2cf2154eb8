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
        self.limit = RateLimit(rate)
        self.served = {"requests": 0, "bytes": 0, "refused": 0, "busy": 0}

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port, reuse_port=False)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("serving release chunks to peers on port %d", self.port)
        task_status.started(self.port)
        await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(30):
                    status, body = await self._answer(await _read_head(stream))
                await stream.send(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                                  % (status, len(body)))
                for i in range(0, len(body), 256 * 1024):
                    piece = body[i:i + 256 * 1024]
                    await self.limit.take(len(piece))
                    await stream.send(piece)
                self.served["bytes"] += len(body) if status == 200 else 0
            except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError, ValueError):
                pass

    async def _answer(self, head: bytes) -> tuple[int, bytes]:
        match = _REQUEST.match(head)
        if match is None:
            return 400, b"bad request"
        sha, tok = match.group(1).decode(), match.group(2).decode()
        self.served["requests"] += 1
        if not any(hmac.compare_digest(tok, token(k, sha)) for k in self.keys):
            self.served["refused"] += 1
            return 403, b"not a peer of this release"
        if self.slots.value == 0:
            self.served["busy"] += 1
            return 429, b"too many uploads"
        async with self.slots:
            path = self.chunks / sha
            try:
                return 200, await anyio.Path(path).read_bytes()
            except OSError:
                return 404, b"no such chunk here"


async def _read_head(stream: SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive(4096)
        if len(head) > MAX_HEAD:
            raise ValueError("request head too large")
    return head


async def fetch_from_peer(address: str, sha: str, key: str, timeout: float = 30) -> bytes:
    """One chunk from a peer (``host:port``); raises OSError/ValueError when it cannot."""
    host, _, port = address.rpartition(":")
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(f"GET /chunk/{sha}?t={token(key, sha)} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
            data = b""
            try:
                while True:
                    data += await stream.receive(1024 * 1024)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.") else b"0"
    if status != b"200":
        raise ValueError(f"peer {address} answered {status.decode(errors='replace')}: {body[:100]!r}")
    return body
