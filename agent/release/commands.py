"""Receiving a release (``zy.release.fetch``, ``zy.release.place``, ``zy.release.rollback``).

Fetch: the signed command carries the manifest and its digest. Each missing chunk is fetched
by its SHA-256 from where the proxy's tracker says (a peer holding it, or the proxy, which seeds
each chunk to a few agents only), or straight from the upstream when there is no tracker, and
checked against the manifest before it is written, once, at its offset in the release file
(:mod:`agent.release.chunkstore`). A chunk that fails the check is asked for again and the bad source
noted and reported; chunks held already (a resumed fetch, or a release sharing chunks with an
earlier one) are not fetched again.

Place: the file goes to ``dest`` atomically, the previous one kept for a rollback
(:mod:`agent.release.place`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from hcsdk.protocol.manifest import Manifest, ManifestError
from hcsdk.protocol.names import UnsafeName, check_sha256, is_digest_dir
from hcsdk.protocol.tasks import TaskStatus

from ..executor import Task, TaskFailed
from ..jsonfile import write_json
from ..plugins.api import Arg, validate
from .chunkstore import (
    MANIFEST,
    PART_SUFFIX,
    ChunkStore,
    mark_verified,
    read_manifest,
    verified_sha256,
)
from .fetch import Job, TrackerClient, fetch_missing
from .peer import PeerServer, RateLimit
from .place import checked_dest, place, rollback

if TYPE_CHECKING:
    from ..services import AgentServices

FETCH_ARGS = {"manifest": Arg(dict), "digest": Arg(str, min=64, max=64), "parallel": Arg(int, default=4, min=1, max=16),
              "peer_key": Arg(str, default="", max=64), "p2p": Arg(bool, default=True),
              "rate": Arg(float, default=0.0, min=0, help="bytes a second this agent downloads at most (0: no cap)")}
PLACE_ARGS = {"digest": Arg(str, min=64, max=64), "dest": Arg(str, min=1, max=4096),
              "mode": Arg(int, default=0o644, min=0, max=0o7777),
              "sha256": Arg(str, default="", max=64, help="the file's SHA-256 (from the manifest): checked on disk")}
ROLLBACK_ARGS = {"dest": Arg(str, min=1, max=4096), "digest": Arg(str, min=64, max=64)}


class Releases:
    def __init__(self, services: AgentServices, store: ChunkStore, peer: PeerServer | None, keep: int = 3) -> None:
        self.services = services
        self.keep = max(1, keep)
        self.store = store
        #: serves release chunks to peers once a release is fetched (None: this agent does not)
        self.peer = peer
        self._peer_port: int | None = None
        self.tracker: TrackerClient | None = None  # made at the first release fetched through a tracker

    async def start_peer_server(self) -> int:
        """Start serving chunks to peers (on first use: an agent that never gets a release never
        listens); the port it listens on."""
        tg = self.services.task_group
        assert self.peer is not None and tg is not None
        if self._peer_port is None:
            self._peer_port = await tg.start(self.peer.serve)
        return self._peer_port

    # -- fetch ----------------------------------------------------------------------------------
    async def fetch(self, task: Task) -> tuple[str, int | None]:
        args = _checked(validate(FETCH_ARGS, task.args), "digest", "peer_key")
        manifest = _manifest(args["manifest"], args["digest"])
        started = time.monotonic()
        job = await anyio.to_thread.run_sync(self._open, manifest, args["digest"])
        try:
            if job.pending:
                await self._fetch_missing(task, job, args)
            await anyio.to_thread.run_sync(self._finish, job)
        finally:
            job.close()
        gone = await anyio.to_thread.run_sync(self._prune, job.final.parent)
        if gone and self.tracker is not None:
            self.tracker.forget(gone)
            await self.tracker.announce()
        stats = job.stats
        task.result = {"path": str(job.final), "size": manifest.size, "sha256": manifest.sha256,
                       "chunks": len(job.first), "reused": stats["reused"], "bytes_upstream": stats["bytes_upstream"],
                       "bytes_peers": stats["bytes_peers"], "corrupt": len(stats["corrupt"]),
                       "seconds": round(time.monotonic() - started, 3)}
        if stats["corrupt"]:
            self.services.emit_text(task, "stderr", "".join(f"{c}\n" for c in stats["corrupt"]))
        return TaskStatus.OK, 0

    def _open(self, manifest: Manifest, digest: str) -> Job:
        """The release file to fill: a finished one that checks out needs nothing; otherwise a part
        file (resumed where a dead agent left it), with every chunk this agent holds anywhere
        copied in."""
        home = self.store.home(digest)
        home.mkdir(parents=True, exist_ok=True)
        os.utime(home)  # the newest releases are kept (see _prune)
        if read_manifest(home / MANIFEST) != manifest:
            write_json(home / MANIFEST, manifest.to_dict())
        job = Job(manifest, home, self.store)
        if job.final.is_file():
            if verified_sha256(job.final) == manifest.sha256 or _intact(manifest, job.final):
                job.pending, job.stats["reused"] = [], len(job.first)
                return job
            self.store.drop_file(job.final)  # changed behind our back: its good chunks are copied below
        fresh = not job.part.exists()
        job.fd = os.open(job.part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.ftruncate(job.fd, manifest.size)
        old = os.open(job.final, os.O_RDONLY | os.O_NOFOLLOW) if job.final.is_file() else None
        try:
            for index in list(job.pending):
                if (not fresh and job.held(index)) or (old is not None and job.copy(old, index)) \
                        or self._copy_held(job, index):
                    job.pending.remove(index)
                    job.stats["reused"] += 1
                    self.store.add(manifest.chunks[index], job.part, job.offset(index), manifest.chunk_length(index))
        finally:
            if old is not None:
                os.close(old)
                job.final.unlink()
        return job

    def _copy_held(self, job: Job, index: int) -> bool:
        data = self.store.read(job.manifest.chunks[index])
        return data is not None and job.write(index, data)

    def _finish(self, job: Job) -> None:
        if job.fd is None:
            return
        job.close()
        if job.final.is_symlink():
            job.final.unlink()
        job.part.replace(job.final)
        self.store.moved(job.part, job.final)
        mark_verified(job.final, job.manifest.sha256)  # every chunk was checked as it was written

    def _prune(self, current: Path) -> set[str]:
        """Keep the newest ``keep`` release files (by their last fetch). A file placed at a
        destination is another link to it and stays; a release still coming is never removed.
        The chunk hashes no longer held anywhere."""
        # only directories named as ChunkStore.home names them: nothing else under root is ours to remove
        homes = sorted((h for h in self.store.root.iterdir() if is_digest_dir(h.name) and h.is_dir()
                        and not h.is_symlink()), key=lambda h: h.stat().st_mtime, reverse=True)
        gone: set[str] = set()
        for home in homes[self.keep:]:
            if home == current or any(home.glob(f"*{PART_SUFFIX}")):
                continue
            manifest = read_manifest(home / MANIFEST)
            self.store.drop_dir(home)
            shutil.rmtree(home, ignore_errors=True)
            gone.update(manifest.chunks if manifest is not None else ())
        return {sha for sha in gone if not self.store.has(sha)}

    async def _fetch_missing(self, task: Task, job: Job, args: dict[str, Any]) -> None:
        job.tracker = await self._join(args, job) if args["p2p"] and args["peer_key"] else None
        try:
            await fetch_missing(job, self.services.channel, args["parallel"], RateLimit(args["rate"]))
        except BaseExceptionGroup as group:
            failed = group.subgroup(TaskFailed)
            if failed is None:
                raise
            self.services.emit_text(task, "stderr", "".join(f"{c}\n" for c in job.stats["corrupt"]))
            raise failed.exceptions[0] from None

    async def _join(self, args: dict[str, Any], job: Job) -> TrackerClient | None:
        """Serve what we hold to peers of this release, and find peers; None without a tracker
        (an agent straight on the master)."""
        job.peer_key = args["peer_key"]
        if self.tracker is None:
            port = 0
            if self.peer is not None:  # with --no-peer it only takes from peers
                port = await self.start_peer_server()
            slots = self.peer.uploads if self.peer is not None else 1
            self.tracker = TrackerClient(self.services.channel, port, slots)
        if self.peer is not None:
            self.peer.keys.add(args["peer_key"])
        self.tracker.note([sha for sha, i in job.first.items() if i not in job.pending])
        return self.tracker if await self.tracker.announce() else None

    def reconnected(self) -> None:
        """A new session (after a proxy restart, say): tell the tracker again what we serve;
        a new tracker knows nothing."""
        tg = self.services.task_group
        if self.tracker is not None and self.tracker.held and tg is not None:
            tg.start_soon(self.tracker.announce)

    # -- place and rollback ---------------------------------------------------------------------
    async def place(self, task: Task) -> tuple[str, int | None]:
        args = _checked(validate(PLACE_ARGS, task.args), "digest", "sha256")
        dest = self._dest(args["dest"])
        source = self._fetched(args["digest"])
        task.result = await anyio.to_thread.run_sync(place, source, dest, args["mode"], args["digest"],
                                                     args["sha256"] or verified_sha256(source) or "")
        return TaskStatus.OK, 0

    async def rollback(self, task: Task) -> tuple[str, int | None]:
        args = _checked(validate(ROLLBACK_ARGS, task.args), "digest")
        dest = self._dest(args["dest"])
        task.result = await anyio.to_thread.run_sync(rollback, dest, args["digest"])
        return TaskStatus.OK, 0

    def _dest(self, text: str) -> Path:
        """``{hostname}`` and ``{uuid}`` in a destination are this agent's."""
        hostname = self.services.hostname or socket.gethostname()
        return checked_dest(text.replace("{hostname}", hostname).replace("{uuid}", self.services.uuid))

    def _fetched(self, digest: str) -> Path:
        home = self.store.home(digest)
        manifest = read_manifest(home / MANIFEST)
        final = home / manifest.name if manifest is not None else None
        if final is None or not final.is_file():
            raise TaskFailed(f"release {digest[:16]} has not been fetched on this agent (run zy.release.fetch first)")
        return final


def _checked(args: dict[str, Any], *hexes: str) -> dict[str, Any]:
    """``args`` once each of ``hexes`` is a SHA-256 in lowercase hex (or empty, where optional):
    a digest names the release's directory here, so it is checked before it names anything,
    whoever signed the command."""
    for name in hexes:
        if args[name] or name == "digest":
            try:
                check_sha256(args[name], f"args.{name}")
            except UnsafeName as exc:
                raise TaskFailed(f"{exc}: refused") from None
    return args


def _manifest(data: dict[str, Any], digest: str) -> Manifest:
    try:
        manifest = Manifest.from_dict(data)
    except ManifestError as exc:
        raise TaskFailed(f"bad manifest: {exc}") from None
    if manifest.digest() != digest:
        raise TaskFailed(f"the manifest's digest is {manifest.digest()}, the signed command says {digest}: refused")
    return manifest


def _intact(manifest: Manifest, path: Path) -> bool:
    """Whether ``path`` is the manifest's file, chunk by chunk."""
    try:
        if path.stat().st_size != manifest.size:
            return False
        with open(path, "rb") as fh:
            return all(manifest.chunks[i] == hashlib.sha256(fh.read(manifest.chunk_length(i))).hexdigest()
                       for i in range(len(manifest.chunks)))
    except OSError:
        return False
