"""Content-addressed files the master hands to agents (artifact chunks, agent builds).

``POST /api/v1/blobs`` (admin token) streams a file in; it is stored under its SHA-256, which is
the answer. Agents fetch it with ``GET /v1/blob?sha256=...`` on the channel's connection (direct
or through their proxies) and check it against the hash in the signed command that named it.

Where the bytes live depends on the store. SQLite (one master): files in DATA_DIR/blobs, as
ever. A store with the ``BlobBytes`` capability (PostgreSQL, several masters): the store holds
the bytes, so every master serves every blob, and DATA_DIR/blobs is a read-through cache: an
upload lands in both, and a master asked for a blob it has no file of streams it from the store
while writing the file, so it reads the store for that blob once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio
import anyio.to_thread

from hcsdk.net.asgi import ClientGone, Receive, Scope, Send, error, query, respond
from hcsdk.net.channel_server import bearer_token
from hcsdk.net.limits import authenticated, send_file
from hcsdk.protocol.names import is_sha256

from .bootstrap import secret_hash
from .hub import Hub
from .store import AgentRecord
from .store.blob_bytes import BlobBytes, BlobDigestError

log = logging.getLogger("zy.master.blobs")
T = TypeVar("T")

MAX_BLOB = 2 * 1024**3
#: bytes read from the store and sent at a time: what one download out of the store holds in
#: memory (as send_file's 256 KiB for a file)
READ_PIECE = 256 * 1024
#: the share of the store's connections (its ``concurrency``) blob reads may take at once: the
#: rest stay free for everything else (a release to a thousand agents must not stall ingest)
STORE_READ_SHARE = 0.5


class BlobStore:
    def __init__(self, root: Path, hub: Hub) -> None:
        self.root = root
        self.hub = hub
        store = hub.db.store
        #: the store keeping the bytes, or None: files only (SQLite)
        self.shared: BlobBytes | None = store if isinstance(store, BlobBytes) else None
        self._reads = anyio.CapacityLimiter(max(1, int(getattr(store, "concurrency", 1) * STORE_READ_SHARE)))

    def path(self, sha: str) -> Path | None:
        """The local file of a blob (with a shared store: the cache's), None when absent."""
        if not is_sha256(sha):
            return None
        path = self.root / sha
        return path if path.is_file() else None

    async def size(self, sha: str) -> int | None:
        """The size of a blob this master can serve (from its file or the store), else None."""
        return (await self.sizes([sha])).get(sha)

    async def sizes(self, shas: list[str]) -> dict[str, int]:
        """sha -> size of the blobs this master can serve; the store asked once for the rest."""
        found = {s: p.stat().st_size for s in shas if (p := self.path(s)) is not None}
        rest = [s for s in dict.fromkeys(shas) if s not in found and is_sha256(s)]
        if rest and self.shared is not None:
            found.update(await self._in_thread(self.shared.blob_sizes, rest))
        return found

    async def upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the body to disk while hashing it: a build never sits whole in memory."""
        if not await self.admin(scope, send):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".upload-{secrets.token_hex(8)}"
        try:
            got = await self._receive_to(tmp, receive, send)
            if got is None:
                return
            sha, size = got
            if self.shared is not None and not await self._share(tmp, sha, send):
                return
            os.replace(tmp, self.root / sha)
        finally:
            tmp.unlink(missing_ok=True)
        await respond(send, 200, {"sha256": sha, "size": size})

    async def _receive_to(self, tmp: Path, receive: Receive, send: Send) -> tuple[str, int] | None:
        """The body into ``tmp`` (fsynced), bounded by MAX_BLOB: (sha256, size), or None once
        the refusal is answered (or the client left)."""
        digest, size = hashlib.sha256(), 0
        async with await anyio.open_file(tmp, "wb") as fh:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return None
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > MAX_BLOB:
                    await error(send, 413, f"the file exceeds {MAX_BLOB} bytes")
                    return None
                digest.update(chunk)
                await fh.write(chunk)
                if not msg.get("more_body"):
                    break
            await fh.flush()
            await anyio.to_thread.run_sync(os.fsync, fh.wrapped.fileno())
        if size == 0:
            await error(send, 400, "the upload is empty")
            return None
        return digest.hexdigest(), size

    async def _share(self, tmp: Path, sha: str, send: Send) -> bool:
        """The received file into the store (which hashes it again before it commits: bytes
        that changed on disk meanwhile are never stored under ``sha``). False once answered."""
        assert self.shared is not None
        shared = self.shared

        def put() -> None:
            with tmp.open("rb") as fh:
                shared.put_blob(sha, _read_pieces(fh))

        try:
            await anyio.to_thread.run_sync(put)
        except BlobDigestError as exc:
            log.error("upload %s not stored: %s", sha, exc)
            await error(send, 500, f"the upload changed on the master's disk before it was stored ({exc})",
                        kind="blob")
            return False
        except Exception as exc:  # the store unreachable, full, ...: say so; the client may retry
            log.warning("upload %s not stored: %s", sha, exc)
            await error(send, 503, f"the master could not store the upload in its store: {exc}", kind="store")
            return False
        return True

    async def download(self, scope: Scope, receive: Receive, send: Send, row: AgentRecord | None) -> None:
        if row is None:
            return  # the caller answered 401/403 already
        sha = query(scope).get("sha256", "")
        path = self.path(sha)
        size = None if path is not None or self.shared is None or not is_sha256(sha) else await self.size(sha)
        if path is None and size is None:
            await error(send, 404, f"no file with SHA-256 {sha!r} on the master", kind="blob")
            return
        # how often blobs leave the master (and how many bytes): what proxy caches save shows here
        # (GET /api/v1/status)
        self.hub.stats["blobs_served"] = self.hub.stats.get("blobs_served", 0) + 1
        if path is not None:
            # streamed from disk a chunk at a time: eight downloads of a 200 MiB build held 1.4 GiB
            # when each was read whole
            sent = await send_file(send, path, send_timeout=self.hub.settings.send_timeout)
        else:
            assert size is not None
            sent = await self._send_from_store(send, sha, size)
        self.hub.stats["blob_bytes_served"] = self.hub.stats.get("blob_bytes_served", 0) + sent

    async def _send_from_store(self, send: Send, sha: str, size: int) -> int:
        """Answer 200 with a blob read from the store a piece at a time (never whole in memory),
        written on the way into the cache file, which is kept only when complete and matching
        its hash. Raises ClientGone as send_file does (the client left, or stalled past
        send_timeout, or the store ended short)."""
        assert self.shared is not None
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(size).encode())]})
        cache = _Cache(self.root, sha)
        sent = 0
        try:
            while sent < size:
                data = await self._in_thread(_read_into, self.shared, cache, sent, min(READ_PIECE, size - sent))
                if not data:  # deleted under us: end short (the client's check fails)
                    raise ClientGone()
                sent += len(data)
                await _send_piece(send, data, sent < size, self.hub.settings.send_timeout)
            await anyio.to_thread.run_sync(cache.keep)
        finally:
            cache.drop()
        return sent

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call for blobs: off the event loop, beside (not behind) the store's thread."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._reads)

    async def admin(self, scope: Scope, send: Send) -> bool:
        """The admin token, from the headers: checked before any body is read (401 otherwise,
        with the API's own messages)."""
        token = bearer_token(scope)
        if token is None:
            await error(send, 401, "API token missing (send 'Authorization: Bearer <token>')", kind="auth")
            return False
        expected = await self.hub.db(self.hub.db.store.get_meta, "admin_token_hash") or ""
        if not hmac.compare_digest(expected, secret_hash(token)):
            await error(send, 401, "API token is not valid", kind="auth")
            return False
        authenticated(scope)
        return True


async def _send_piece(send: Send, data: bytes, more: bool, send_timeout: float | None) -> None:
    try:
        with anyio.fail_after(send_timeout):
            await send({"type": "http.response.body", "body": data, "more_body": more})
    except Exception as exc:  # granian raises when the peer is gone; TimeoutError when stalled
        raise ClientGone() from exc


def _read_into(shared: BlobBytes, cache: _Cache, offset: int, length: int) -> bytes:
    """One piece from the store, written to the cache file in the same trip off the loop."""
    data = shared.read_blob(cache.sha, offset, length)
    cache.write(data)
    return data


def _read_pieces(fh: IO[bytes], piece: int = 1024 * 1024) -> Iterator[bytes]:
    while data := fh.read(piece):
        yield data


class _Cache:
    """A blob's local copy being written while it is served from the store: kept (renamed into
    place) only when every byte arrived and they hash to its name; a failing disk only costs
    the cache, never the download."""

    def __init__(self, root: Path, sha: str) -> None:
        self.sha = sha
        self.final = root / sha
        self.tmp = root / f".cache-{secrets.token_hex(8)}"
        self.digest = hashlib.sha256()
        self.fh: IO[bytes] | None = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.fh = self.tmp.open("wb")
        except OSError as exc:
            log.warning("blob %s: no cache file (%s); served from the store", sha, exc)

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        if self.fh is not None:
            try:
                self.fh.write(data)
            except OSError as exc:
                log.warning("blob %s: cache file not written (%s)", self.sha, exc)
                self.drop()

    def keep(self) -> None:
        if self.fh is None:
            return
        if self.digest.hexdigest() != self.sha:
            log.error("blob %s: the store's bytes hash to %s; not cached", self.sha, self.digest.hexdigest())
            return
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None
            os.replace(self.tmp, self.final)
        except OSError as exc:
            log.warning("blob %s: cache file not kept (%s)", self.sha, exc)

    def drop(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self.tmp.unlink(missing_ok=True)
