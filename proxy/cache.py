"""The proxy's chunk cache: the CDN edge.

Every blob (a 4 MiB chunk of an artifact, or an agent build) that passes through a proxy is kept
on its disk under ``<data_dir>/cache/<aa>/<sha256>``, so it crosses the link above the proxy
once. Content addressing makes the cache simple and safe:

- a file's name is its SHA-256: a chunk is checked when it arrives from upstream (a mismatch is
  answered 502 and not kept) and again each time it is served from disk (a corrupt file, from
  bit rot or tampering, is deleted and fetched upstream again), so the proxy never hands out bytes
  that differ from their name, whatever happened to its disk;
- files are written to a temporary name, fsynced and renamed, so a crash leaves either the whole
  chunk or none;
- the size is bounded (``limit`` bytes; 0 turns caching off) with least-recently-used eviction.
  The order lives in memory and is rebuilt from the files' mtimes at start (a hit touches the
  file), so a restarted proxy keeps its cache and roughly its order;
- single flight: concurrent requests for a chunk that is not here make one upstream request; the
  others wait for it and are answered with the same bytes;
- a blob larger than the whole cache is passed through, not kept.

Memory: a blob fetched from upstream as a stream (``Answer.stream``: what the proxy's own fetch
gives) goes to a temporary file as it arrives, hashed on the way, and is then sent from that
file, so a 200 MiB build passing through holds a block, not the build; a cached file up to
``_WHOLE`` bytes is read once, checked and sent, a larger one is checked and then sent in
pieces from the same open file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio

from hcsdk.common.files import atomic_write, fsync_dir
from hcsdk.net.asgi import Send
from hcsdk.net.limits import send_file
from hcsdk.protocol.names import is_sha256
from hcsdk.protocol.wire import dumps

log = logging.getLogger("zy.proxy.cache")

#: a cached file up to this size is read whole, checked and sent from memory; larger ones stream
_WHOLE = 8 * 1024 * 1024
_BLOCK = 1024 * 1024

COUNTERS = ("requests", "hits", "misses", "coalesced", "upstream_fetches", "upstream_errors", "bytes_from_upstream",
            "bytes_served", "corrupt_upstream", "corrupt_cached", "evictions", "passthrough", "write_errors")


class UpstreamDown(Exception):
    """The next tier cannot be asked right now (no channel, or the request failed)."""


@dataclass
class Answer:
    """What a request for a blob is answered with."""

    status: int
    body: bytes
    content_type: bytes = b"application/octet-stream"
    #: the body is (now) in the cache: requests that shared it count as hits
    cached: bool = False
    #: a 200's body as it arrives (instead of ``body``): written to disk, never held whole
    stream: AsyncIterator[bytes] | None = None
    #: the checked body on disk (in the cache, or a temporary file when passed through)
    path: Path | None = None
    temporary: bool = False


@dataclass(eq=False)
class _Flight:
    done: anyio.Event = field(default_factory=anyio.Event)
    answer: Answer | None = None
    #: requests that will send this answer (the fetching one and those waiting on it): the
    #: last one removes a temporary file
    users: int = 1


Fetch = Callable[[str], Awaitable[Answer]]


def _problem(status: int, message: str, kind: str) -> Answer:
    return Answer(status, dumps({"error": message, "kind": kind}), b"application/json")


class ChunkCache:
    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = max(0, int(limit))
        self.counters = dict.fromkeys(COUNTERS, 0)
        #: sha -> size, least recently used first
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._size = 0
        self._flights: dict[str, _Flight] = {}
        if self.limit:
            self._load()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def path(self, sha: str) -> Path:
        assert is_sha256(sha), sha  # never a path from unchecked input
        return self.root / sha[:2] / sha

    def __contains__(self, sha: str) -> bool:
        return sha in self._lru

    def stats(self) -> dict[str, int | float]:
        """The counters, and the cache's size. Each request counts in ``requests`` as it comes and
        in ``hits`` or ``misses`` once answered: hits + misses == requests when none is in flight."""
        c = self.counters
        looked = c["hits"] + c["misses"]
        return {**c, "entries": len(self._lru), "size_bytes": self._size, "limit_bytes": self.limit,
                "hit_ratio": round(c["hits"] / looked, 4) if looked else 0.0}

    # -- start -------------------------------------------------------------------------------
    def _load(self) -> None:
        """Rebuild the index from the files: oldest mtime first. Leftover temporary files (a
        crash mid-write) and anything not named like a chunk are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for sub in self.root.iterdir():
            if not sub.is_dir() or not re.fullmatch(r"[0-9a-f]{2}", sub.name):
                continue
            for entry in os.scandir(sub):
                if entry.is_file(follow_symlinks=False) and is_sha256(entry.name) and entry.name[:2] == sub.name:
                    st = entry.stat(follow_symlinks=False)
                    found.append((st.st_mtime, entry.name, st.st_size))
                elif entry.name.startswith(".tmp-"):
                    _unlink(Path(entry.path))
        for _, sha, size in sorted(found):
            self._lru[sha] = size
            self._size += size
        self._evict(0)
        if found:
            log.info("chunk cache: %d files, %d bytes (limit %d)", len(self._lru), self._size, self.limit)

    # -- serving -----------------------------------------------------------------------------
    async def serve(self, sha: str, send: Send, fetch: Fetch | None) -> None:
        """Answer a request for blob ``sha``: from disk when it is here (and intact), else from
        ``fetch`` (one upstream request however many ask at once). ``fetch`` None: the upstream
        cannot be asked (the proxy has no channel), so only what is cached can be served."""
        if not is_sha256(sha):
            await _send(send, _problem(404, f"no file with SHA-256 {sha!r}: not a SHA-256 in lowercase hex", "blob"))
            return
        self.counters["requests"] += 1
        for _ in range(4):  # a round ends early only when a file vanished or was found corrupt
            if sha in self._lru and await self._from_disk(sha, send):
                self.counters["hits"] += 1
                return
            flight = self._flights.get(sha)
            if flight is not None:  # another request is fetching it: wait and share its answer
                flight.users += 1
                try:
                    await flight.done.wait()
                    if flight.answer is None:
                        continue  # that request was cancelled before it had an answer
                    self.counters["coalesced"] += 1
                    await self._answer(send, flight.answer)
                finally:
                    self._release(flight)
                self.counters["hits" if flight.answer.cached else "misses"] += 1
                return
            if fetch is None:
                break
            flight = self._flights[sha] = _Flight()
            try:
                try:
                    flight.answer = await self._fetch(sha, fetch)
                finally:
                    del self._flights[sha]
                    flight.done.set()
                await self._answer(send, flight.answer)
            finally:
                self._release(flight)
            self.counters["misses"] += 1
            return
        await _send(send, _problem(503, f"the proxy has no upstream right now and chunk {sha} is not in its "
                                        "cache; try again", "upstream"))
        self.counters["misses"] += 1

    async def _fetch(self, sha: str, fetch: Fetch) -> Answer:
        self.counters["upstream_fetches"] += 1
        try:
            answer = await fetch(sha)
        except UpstreamDown as exc:
            self.counters["upstream_errors"] += 1
            return _problem(503, str(exc), "upstream")
        if answer.status != 200:
            return answer  # the next tier's own answer (404: no such file; 409: session), as it is
        if answer.stream is not None:
            return await self._fetch_to_disk(sha, answer.stream)
        body = answer.body
        self.counters["bytes_from_upstream"] += len(body)
        actual = await _sha256(body)
        if actual != sha:
            self.counters["corrupt_upstream"] += 1
            log.warning("chunk %s arrived from upstream corrupt (SHA-256 %s, %d bytes): not cached", sha, actual,
                        len(body))
            return _problem(502, f"chunk {sha} arrived from upstream corrupt: its {len(body)} bytes hash to "
                                 f"{actual}; it was not cached or served, try again", "blob")
        if not self.enabled or len(body) > self.limit:
            self.counters["passthrough"] += 1
            return answer
        cached = await self._store(sha, body)
        return Answer(200, body, cached=cached)

    async def _fetch_to_disk(self, sha: str, stream: AsyncIterator[bytes]) -> Answer:
        """Write a streamed body to a temporary file, hashing it on the way; then keep it (renamed
        into the cache) or pass it through from the temporary file."""
        tmp = self._spool(sha) / f".tmp-{sha[:16]}-{secrets.token_hex(4)}"
        try:
            actual, size = await _drain(stream, tmp)
        except UpstreamDown as exc:
            _unlink(tmp)
            self.counters["upstream_errors"] += 1
            return _problem(503, str(exc), "upstream")
        except BaseException:
            _unlink(tmp)
            raise
        self.counters["bytes_from_upstream"] += size
        if actual != sha:
            _unlink(tmp)
            self.counters["corrupt_upstream"] += 1
            log.warning("blob %s arrived from upstream corrupt (SHA-256 %s, %d bytes): not cached", sha, actual, size)
            return _problem(502, f"chunk {sha} arrived from upstream corrupt: its {size} bytes hash to "
                                 f"{actual}; it was not cached or served, try again", "blob")
        if not self.enabled or size > self.limit:
            self.counters["passthrough"] += 1
            return Answer(200, b"", path=tmp, temporary=True)
        self._evict(size)
        try:
            await anyio.to_thread.run_sync(_rename_into_place, tmp, self.path(sha))
        except OSError as exc:  # a full or failing disk: serve it from where it is, keep nothing
            self.counters["write_errors"] += 1
            log.warning("could not cache chunk %s: %s", sha, exc)
            return Answer(200, b"", path=tmp, temporary=True)
        if sha not in self._lru:
            self._lru[sha] = size
            self._size += size
        self._evict(0, keep=sha)
        return Answer(200, b"", path=self.path(sha), cached=True)

    def _spool(self, sha: str) -> Path:
        """Where a body arriving from upstream is written: beside where it will be kept (a crash
        leaves a ``.tmp-`` file that the next start removes), or with the cache off, the
        system's temporary directory."""
        if self.enabled:
            where = self.path(sha).parent
            where.mkdir(parents=True, exist_ok=True)
            return where
        return Path(tempfile.gettempdir())

    def _release(self, flight: _Flight) -> None:
        flight.users -= 1
        answer = flight.answer
        if flight.users == 0 and answer is not None and answer.temporary and answer.path is not None:
            _unlink(answer.path)

    async def _from_disk(self, sha: str, send: Send) -> bool:
        """Serve ``sha`` from disk after checking it; False when it is gone or was corrupt
        (then it is deleted and counted, and the caller fetches it again)."""
        path = self.path(sha)
        try:
            ok, data, fh, size = await anyio.to_thread.run_sync(_open_checked, path, sha)
        except FileNotFoundError:
            self._forget(sha)
            return False
        except OSError as exc:
            log.warning("chunk %s cannot be read from the cache (%s): dropping it", sha, exc)
            self._drop(sha)
            return False
        if not ok:
            self.counters["corrupt_cached"] += 1
            log.warning("cached chunk %s is corrupt (bit rot or tampering): deleted, fetching it again", sha)
            self._drop(sha)
            return False
        if sha in self._lru:
            self._lru.move_to_end(sha)
        if data is not None:
            await self._answer(send, Answer(200, data, cached=True))
            return True
        assert fh is not None
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream"),
                                    (b"content-length", str(size).encode())]})
            left = size
            while left > 0:
                block = await anyio.to_thread.run_sync(fh.read, min(_BLOCK, left))
                if not block:
                    break  # cannot happen to a file renamed into place; the client sees a short body
                left -= len(block)
                self.counters["bytes_served"] += len(block)
                await send({"type": "http.response.body", "body": block, "more_body": left > 0})
        finally:
            fh.close()
        return True

    async def _answer(self, send: Send, answer: Answer) -> None:
        if answer.path is not None:
            try:
                self.counters["bytes_served"] += await send_file(send, answer.path)
            except FileNotFoundError:  # evicted since it arrived (a tiny cache): it is gone
                await _send(send, _problem(503, "the blob was evicted from the proxy's cache as it arrived; "
                                                "try again", "upstream"))
            return
        if answer.status == 200:
            self.counters["bytes_served"] += len(answer.body)
        await _send(send, answer)

    # -- the index ---------------------------------------------------------------------------
    async def _store(self, sha: str, body: bytes) -> bool:
        if sha in self._lru:
            self._lru.move_to_end(sha)
            return True
        self._evict(len(body))
        try:
            await anyio.to_thread.run_sync(_write_atomically, self.path(sha), body)
        except OSError as exc:  # a full or failing disk: serve it anyway, keep nothing
            self.counters["write_errors"] += 1
            log.warning("could not cache chunk %s: %s", sha, exc)
            return False
        if sha not in self._lru:
            self._lru[sha] = len(body)
            self._size += len(body)
        self._evict(0, keep=sha)
        return True

    def _evict(self, room: int, keep: str | None = None) -> None:
        """Drop least recently used files until ``room`` more bytes fit under the limit."""
        while self._lru and self._size + room > self.limit:
            sha = next(iter(self._lru))
            if sha == keep:
                if len(self._lru) == 1:
                    break
                self._lru.move_to_end(sha)
                continue
            self._drop(sha)
            self.counters["evictions"] += 1

    def _forget(self, sha: str) -> None:
        size = self._lru.pop(sha, None)
        if size is not None:
            self._size -= size

    def _drop(self, sha: str) -> None:
        self._forget(sha)
        _unlink(self.path(sha))


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


async def _sha256(data: bytes) -> str:
    if len(data) < 256 * 1024:
        return hashlib.sha256(data).hexdigest()
    return await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())


def _open_checked(path: Path, sha: str) -> tuple[bool, bytes | None, IO[bytes] | None, int]:
    """(intact, the bytes when small, else the open file at offset 0, size). Touches the file's
    mtime when it is intact: the LRU order survives a restart."""
    fh = open(path, "rb")  # handed to the caller for large files
    try:
        size = os.fstat(fh.fileno()).st_size
        digest = hashlib.sha256()
        data: bytes | None = None
        if size <= _WHOLE:
            data = fh.read()
            digest.update(data)
        else:
            while block := fh.read(_BLOCK):
                digest.update(block)
            fh.seek(0)
        ok = digest.hexdigest() == sha
        if ok:
            now = time.time()
            os.utime(fh.fileno(), (now, now))
    except BaseException:
        fh.close()
        raise
    if not ok or data is not None:
        fh.close()
        return ok, data, None, size
    return ok, None, fh, size


async def _drain(stream: AsyncIterator[bytes], tmp: Path) -> tuple[str, int]:
    """Write ``stream`` to ``tmp`` (fsynced), a megabyte at a time off the event loop:
    (its SHA-256, its size)."""
    digest, size = hashlib.sha256(), 0
    pending: list[bytes] = []
    held = 0
    fh = await anyio.to_thread.run_sync(open, tmp, "wb")
    try:
        try:
            async for block in stream:
                pending.append(block)
                held += len(block)
                if held >= _BLOCK:
                    size += await anyio.to_thread.run_sync(_write_blocks, fh, digest, pending)
                    pending, held = [], 0
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        size += await anyio.to_thread.run_sync(_write_blocks, fh, digest, pending)
        await anyio.to_thread.run_sync(_sync, fh)
    finally:
        fh.close()
    return digest.hexdigest(), size


def _sync(fh: IO[bytes]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _write_blocks(fh: IO[bytes], digest: Any, blocks: list[bytes]) -> int:
    for block in blocks:
        digest.update(block)
        fh.write(block)
    return sum(len(b) for b in blocks)


def _rename_into_place(tmp: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself survives a crash


def _write_atomically(path: Path, body: bytes) -> None:
    """A chunk held in memory, kept. The temp file's ``.tmp-`` prefix is what :meth:`ChunkCache._load`
    removes after a crash; 0o666 (less the umask) is what ``open("wb")`` gave cached files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, body, mode=0o666, sync_dir=True, prefix=f".tmp-{path.name[:16]}-", suffix="")


async def _send(send: Send, answer: Answer) -> None:
    await send({"type": "http.response.start", "status": answer.status,
                "headers": [(b"content-type", answer.content_type),
                            (b"content-length", str(len(answer.body)).encode())]})
    await send({"type": "http.response.body", "body": answer.body})


__all__ = ["COUNTERS", "Answer", "ChunkCache", "Fetch", "UpstreamDown"]
