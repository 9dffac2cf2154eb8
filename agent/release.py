"""Receiving a release (``zy.release.fetch``, ``zy.release.place``, ``zy.release.rollback``).

Fetch: the signed command carries the manifest and its digest. Each missing chunk is fetched
by its SHA-256 from where the proxy's tracker says (a peer holding it, or the proxy, which seeds
each chunk to a few agents only), or straight from the upstream when there is no tracker, and
checked against the manifest before it is written, once, at its offset in the release file
(:mod:`agent.chunkstore`). A chunk that fails the check is asked for again and the bad source
noted and reported; chunks held already (a resumed fetch, or a release sharing chunks with an
earlier one) are not fetched again.

Place: the file goes to ``dest`` atomically (a hard link or copy under a temp name, fsync,
rename); the previous file is kept as ``dest.zy-prev`` (hard-linked first, so ``dest`` is never
missing). Rollback puts it back.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from hcsdk.common.files import fsync_dir
from hcsdk.protocol.manifest import Manifest, ManifestError
from hcsdk.protocol.names import UnsafeName, check_sha256, is_digest_dir

from .chunkstore import (
    MANIFEST,
    PART_SUFFIX,
    ChunkStore,
    mark_verified,
    read_manifest,
    verified_sha256,
)
from .executor import Task, TaskFailed
from .jsonfile import write_json
from .peer import PeerServer, RateLimit
from .plugins.api import Arg, PluginError, validate
from .plugins.file import check_path
from .release_fetch import Job, Swarm, fetch_missing

if TYPE_CHECKING:
    from .services import AgentServices

FETCH_ARGS = {"manifest": Arg(dict), "digest": Arg(str, min=64, max=64), "parallel": Arg(int, default=4, min=1, max=16),
              "peer_key": Arg(str, default="", max=64), "p2p": Arg(bool, default=True),
              "rate": Arg(float, default=0.0, min=0, help="bytes a second this agent downloads at most (0: no cap)")}
PLACE_ARGS = {"digest": Arg(str, min=64, max=64), "dest": Arg(str, min=1, max=4096),
              "mode": Arg(int, default=0o644, min=0, max=0o7777),
              "sha256": Arg(str, default="", max=64, help="the file's SHA-256 (from the manifest): checked on disk")}
ROLLBACK_ARGS = {"dest": Arg(str, min=1, max=4096), "digest": Arg(str, min=64, max=64)}
PREV_SUFFIX = ".zy-prev"


class Releases:
    def __init__(self, services: AgentServices, store: ChunkStore, peer: PeerServer | None, keep: int = 3) -> None:
        self.services = services
        self.keep = max(1, keep)
        self.store = store
        #: serves release chunks to peers once a release is fetched (None: this agent does not)
        self.peer = peer
        self._peer_port: int | None = None
        self.swarm: Swarm | None = None  # made at the first release fetched through a tracker

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
        if gone and self.swarm is not None:
            self.swarm.forget(gone)
            await self.swarm.announce()
        stats = job.stats
        task.result = {"path": str(job.final), "size": manifest.size, "sha256": manifest.sha256,
                       "chunks": len(job.first), "reused": stats["reused"], "bytes_upstream": stats["bytes_upstream"],
                       "bytes_peers": stats["bytes_peers"], "corrupt": len(stats["corrupt"]),
                       "seconds": round(time.monotonic() - started, 3)}
        if stats["corrupt"]:
            self.services.emit_text(task, "stderr", "".join(f"{c}\n" for c in stats["corrupt"]))
        return "ok", 0

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
        job.swarm = await self._join(args, job) if args["p2p"] and args["peer_key"] else None
        try:
            await fetch_missing(job, self.services.channel, args["parallel"], RateLimit(args["rate"]))
        except BaseExceptionGroup as group:
            failed = group.subgroup(TaskFailed)
            if failed is None:
                raise
            self.services.emit_text(task, "stderr", "".join(f"{c}\n" for c in job.stats["corrupt"]))
            raise failed.exceptions[0] from None

    async def _join(self, args: dict[str, Any], job: Job) -> Swarm | None:
        """Serve what we hold to peers of this release, and find peers; None without a tracker
        (an agent straight on the master)."""
        job.peer_key = args["peer_key"]
        if self.swarm is None:
            port = 0
            if self.peer is not None:  # with --no-peer it only takes from peers
                port = await self.start_peer_server()
            slots = self.peer.uploads if self.peer is not None else 1
            self.swarm = Swarm(self.services.channel, port, slots)
        if self.peer is not None:
            self.peer.keys.add(args["peer_key"])
        self.swarm.note([sha for sha, i in job.first.items() if i not in job.pending])
        return self.swarm if await self.swarm.announce() else None

    def reconnected(self) -> None:
        """A new session (after a proxy restart, say): tell the tracker again what we serve;
        a new tracker knows nothing."""
        tg = self.services.task_group
        if self.swarm is not None and self.swarm.held and tg is not None:
            tg.start_soon(self.swarm.announce)

    # -- place and rollback ---------------------------------------------------------------------
    async def place(self, task: Task) -> tuple[str, int | None]:
        args = _checked(validate(PLACE_ARGS, task.args), "digest", "sha256")
        dest = self._dest(args["dest"])
        source = self._fetched(args["digest"])
        task.result = await anyio.to_thread.run_sync(_place, source, dest, args["mode"], args["digest"],
                                                     args["sha256"] or verified_sha256(source) or "")
        return "ok", 0

    async def rollback(self, task: Task) -> tuple[str, int | None]:
        args = _checked(validate(ROLLBACK_ARGS, task.args), "digest")
        dest = self._dest(args["dest"])
        task.result = await anyio.to_thread.run_sync(_rollback, dest, args["digest"])
        return "ok", 0

    def _dest(self, text: str) -> Path:
        """``{hostname}`` and ``{uuid}`` in a destination are this agent's."""
        hostname = self.services.hostname or socket.gethostname()
        return _dest(text.replace("{hostname}", hostname).replace("{uuid}", self.services.uuid))

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


def _dest(text: str) -> Path:
    try:
        check_path(text)
    except PluginError as exc:
        raise TaskFailed(str(exc)) from None
    dest = Path(text)
    if not dest.parent.is_dir():
        raise TaskFailed(f"cannot place {dest}: its directory {dest.parent} does not exist")
    return dest


def _place(source: Path, dest: Path, mode: int, digest: str, sha256: str) -> dict[str, Any]:
    """Put ``source`` at ``dest`` atomically, keeping what was there for a rollback, and note
    in a journal beside it which release did so (a rollback undoes only its own release)."""
    trusted = bool(sha256) and verified_sha256(source) == sha256  # checked whole, unchanged since
    want = sha256 or _sha256_file(source)
    journal = _journal(dest)
    if dest.is_file() and ((trusted and os.path.samefile(dest, source)) or _sha256_file(dest) == want):
        # already there: placed by this release before a restart (its journal says so), or not ours to undo
        ours = _read_journal(journal).get("digest") == digest
        return {"dest": str(dest), "sha256": want, "placed": ours, "unchanged": True}
    tmp = _stage(source, dest.parent, f".{dest.name}.zy-new.", mode, want, trusted)
    try:
        prev = dest.with_name(dest.name + PREV_SUFFIX)
        had = dest.is_file() and not dest.is_symlink()
        if had:
            link = Path(tempfile.mktemp(dir=dest.parent, prefix=f".{dest.name}.zy-prevlink."))
            os.link(dest, link)  # dest stays in place until the new file replaces it
            os.replace(link, prev)
        write_json(journal, {"digest": digest, "prev": "kept" if had else "none", "sha256": want})
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return {"dest": str(dest), "sha256": want, "placed": True, "previous_kept": had}


def _rollback(dest: Path, digest: str) -> dict[str, Any]:
    """Put back what the release replaced. The journal says "rolled back" before the file moves,
    so asking again (a master restarted mid-rollback) finishes the job or finds it done."""
    journal = _journal(dest)
    entry = _read_journal(journal)
    if entry.get("digest") != digest:
        raise TaskFailed(f"{dest} was not placed by this release (nothing to roll back here)")
    prev = dest.with_name(dest.name + PREV_SUFFIX)
    kept = entry.get("prev") == "kept"
    if entry.get("rolled_back") and not (kept and prev.is_file()):
        return {"dest": str(dest), "sha256": _sha256_file(dest) if dest.is_file() else None, "restored": True,
                "already": True}
    if kept and not prev.is_file():
        raise TaskFailed(f"the previous version of {dest} is gone ({prev} is missing)")
    write_json(journal, {**entry, "rolled_back": True})
    if kept:
        os.replace(prev, dest)
        result: dict[str, Any] = {"dest": str(dest), "sha256": _sha256_file(dest), "restored": True}
    else:  # there was no file before the release: there is none after
        dest.unlink(missing_ok=True)
        result = {"dest": str(dest), "sha256": None, "restored": True, "removed": True}
    fsync_dir(dest.parent)
    return result


def _stage(source: Path, directory: Path, prefix: str, mode: int, sha256: str, trusted: bool) -> Path:
    """The release under a fresh name in the destination's directory, checked against ``sha256``
    and on disk: a hard link to the fetched file where the filesystem allows (no byte copied or
    written again; the fetched file is never modified after it is whole), a copy otherwise.
    A ``trusted`` source (checked whole and unchanged since) that is linked is not hashed again.
    The name is new and created exclusively, so nothing planted in the directory is followed."""
    tmp = directory / f"{prefix}{secrets.token_hex(8)}"
    try:
        try:
            os.link(source, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                raise
            _copy_new(source, tmp)
            trusted = False
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not trusted and _sha256_file(tmp) != sha256:
            raise TaskFailed(f"the release at {tmp} does not match its SHA-256: not placed")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _copy_new(source: Path, target: Path) -> None:
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with open(source, "rb") as src:
            size, done = os.fstat(src.fileno()).st_size, 0
            while done < size:
                sent = os.sendfile(out, src.fileno(), done, size - done)
                if sent == 0:
                    raise TaskFailed(f"{source} shrank while it was being copied to {target}")
                done += sent
    finally:
        os.close(out)


def _journal(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.zy-release")


def _read_journal(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
