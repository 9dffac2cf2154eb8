"""Content-addressed files the master hands to agents (artifact chunks, agent builds).

``POST /api/v1/blobs`` (admin token) streams a file in; it is stored under its SHA-256, which is
the answer. Agents fetch it with ``GET /v1/blob?sha256=...`` on the channel's connection (direct
or through their proxies) and check it against the hash in the signed command that named it.

Where the bytes live depends on the store. SQLite (one master): files in DATA_DIR/blobs, as
ever. A store with the ``BlobBytes`` capability (PostgreSQL, several masters): the store holds
the bytes, so every master serves every blob, and DATA_DIR/blobs is a read-through cache: an
upload lands in both, and a master asked for a blob it has no file of copies it from the store
into the file first (once, however many ask at a time), then serves the file as ever.
"""

from __future__ import annotations

import contextlib
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
#: bytes read from the store and sent at a time, when a blob cannot be cached: what such a
#: download holds in memory (as send_file's 256 KiB for a file)
READ_PIECE = 256 * 1024
#: bytes read from the store at a time into a cache file (one piece of the store's)
FILL_PIECE = 1024 * 1024
#: how many blob reads and puts may run at once, as a share of the store's ``concurrency`` (its
#: StoreThread calls at once). They run beside StoreThread, not inside its share: PostgresStore's
#: pool holds connections for both (``pool_size_for``: concurrency + these blob slots + one
#: spare; keep this equal to its BLOB_SHARE), so a release to a thousand agents neither stalls
#: ingest nor waits for a connection
STORE_BLOB_SHARE = 0.5


class BlobStore:
    def __init__(self, root: Path, hub: Hub) -> None:
        self.root = root
        self.hub = hub
        store = hub.db.store
        #: the store keeping the bytes, or None: files only (SQLite)
        self.shared: BlobBytes | None = store if isinstance(store, BlobBytes) else None
        self._reads = anyio.CapacityLimiter(max(1, int(getattr(store, "concurrency", 1) * STORE_BLOB_SHARE)))
        #: blobs being copied from the store into the cache: set when the copy ends
        self._filling: dict[str, anyio.Event] = {}

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
            await self._in_thread(put)  # a pooled connection for the whole put: within the blob share
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
        try:
            path, size = await self._locate(sha)
        except Exception as exc:  # the store unreachable: the agent's fetch retries after a backoff
            log.warning("blob %s not read from the store: %s", sha, exc)
            # the details stay in the log: an agent learns nothing of where the store is
            await error(send, 503, f"the master could not read blob {sha} from its store; retry later", kind="store")
            return
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

    async def _locate(self, sha: str) -> tuple[Path | None, int | None]:
        """(the file to send, None), or (None, size) for a blob to stream from the store (its
        cache file could not be written), or (None, None) for a blob nowhere."""
        path = self.path(sha)
        if path is not None or self.shared is None or not is_sha256(sha):
            return path, None
        size = await self.size(sha)
        if size is None:
            return None, None
        return await self._cached(sha, size), size

    async def _cached(self, sha: str, size: int) -> Path | None:
        """The blob's cache file, copied from the store first when missing; None when it cannot
        be written (the disk full or read-only: the download then streams from the store).

        One copy per blob at a time: the agents of a release asking this master for the same
        chunk at once wait for one read of the store, not one each. The copy runs in a thread
        of its own, at the store's pace, whatever any client's: a slow or stalled reader never
        holds up the others (it stalls only its own send_file)."""
        if (path := self.path(sha)) is not None:  # copied while this request asked the store for its size
            return path
        filling = self._filling.get(sha)
        if filling is None:
            filling = self._filling[sha] = anyio.Event()
            # how often this master read a blob from the store (GET /api/v1/status): once per blob
            self.hub.stats["blobs_from_store"] = self.hub.stats.get("blobs_from_store", 0) + 1
            try:
                await self._in_thread(self._fill, sha, size)
            finally:
                del self._filling[sha]
                filling.set()
        else:
            await filling.wait()
        return self.path(sha)

    def _fill(self, sha: str, size: int) -> None:
        """The blob from the store into its cache file (in a worker thread): a piece at a time,
        renamed into place only when complete and matching its hash."""
        assert self.shared is not None
        tmp = self.root / f".cache-{secrets.token_hex(8)}"
        digest, done = hashlib.sha256(), 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                while done < size and (data := self.shared.read_blob(sha, done, min(FILL_PIECE, size - done))):
                    digest.update(data)
                    fh.write(data)
                    done += len(data)
                fh.flush()
                os.fsync(fh.fileno())
            if done != size or digest.hexdigest() != sha:
                log.error("blob %s: the store gave %d of %d bytes hashing to %s; not cached", sha, done, size,
                          digest.hexdigest())
                return
            os.replace(tmp, self.root / sha)
        except OSError as exc:
            log.warning("blob %s not cached (%s): served from the store", sha, exc)
        finally:
            with contextlib.suppress(OSError):  # not even there to remove (blobs/ is not a folder)
                tmp.unlink(missing_ok=True)

    async def _send_from_store(self, send: Send, sha: str, size: int) -> int:
        """Answer 200 with a blob read from the store a piece at a time (never whole in memory),
        when it could not be cached. Raises ClientGone as send_file does (the client left, or
        stalled past send_timeout, or the store ended short)."""
        assert self.shared is not None
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(size).encode())]})
        sent = 0
        while sent < size:
            try:
                data = await self._in_thread(self.shared.read_blob, sha, sent, min(READ_PIECE, size - sent))
            except Exception as exc:  # the store went away mid-way: end short (the client retries)
                log.warning("blob %s: the store failed after %d of %d bytes: %s", sha, sent, size, exc)
                raise ClientGone() from exc
            if not data:  # deleted under us: end short (the client's check fails)
                raise ClientGone()
            sent += len(data)
            await _send_piece(send, data, sent < size, self.hub.settings.send_timeout)
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


def _read_pieces(fh: IO[bytes], piece: int = 1024 * 1024) -> Iterator[bytes]:
    while data := fh.read(piece):
        yield data
