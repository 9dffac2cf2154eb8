"""Receiving a release (``zy.release.fetch``, ``zy.release.place``, ``zy.release.rollback``).

Fetch: the signed command carries the manifest and its digest; every chunk is fetched by its
SHA-256 from the agent's upstream (its proxy's cache, or the master) and checked against the
manifest before it is kept in ``<state>/chunks/``. A chunk that fails the check is fetched
again (three tries) and the bad source noted; chunks already here are not fetched again, so
an agent that died mid-download resumes where it was. The file is then assembled under
``<state>/releases/`` and checked whole.

Place: the file goes to ``dest`` atomically (temp name, fsync, rename); the previous file is kept
as ``dest.zy-prev`` (hard-linked first, so ``dest`` is never missing). Rollback puts it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from hcsdk._manifest import Manifest, ManifestError

from .executor import Task, TaskFailed
from .jsonfile import write_json
from .peer import RateLimit, fetch_from_peer
from .plugins.api import Arg, PluginError, validate
from .plugins.file import check_path

if TYPE_CHECKING:
    from .core import Agent

FETCH_ARGS = {"manifest": Arg(dict), "digest": Arg(str, min=64, max=64), "parallel": Arg(int, default=4, min=1, max=16),
              "peer_key": Arg(str, default="", max=64), "p2p": Arg(bool, default=True),
              "rate": Arg(float, default=0.0, min=0, help="bytes a second this agent downloads at most (0: no cap)")}
PLACE_ARGS = {"digest": Arg(str, min=64, max=64), "dest": Arg(str, min=1, max=4096),
              "mode": Arg(int, default=0o644, min=0, max=0o7777),
              "sha256": Arg(str, default="", max=64, help="the file's SHA-256 (from the manifest): checked on disk")}
ROLLBACK_ARGS = {"dest": Arg(str, min=1, max=4096), "digest": Arg(str, min=64, max=64)}
#: rounds over every source for one chunk, with a growing pause between them (about a minute in
#: all: a proxy or master restart only ends the agents' sessions for a few seconds)
TRIES = 8
PREV_SUFFIX = ".zy-prev"


class Releases:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.chunks = agent.state.root / "chunks"
        self.releases = agent.state.root / "releases"

    # -- fetch ----------------------------------------------------------------------------------
    async def fetch(self, task: Task) -> tuple[str, int | None]:
        args = validate(FETCH_ARGS, task.args)
        manifest = _manifest(args["manifest"], args["digest"])
        started = time.monotonic()
        stats: dict[str, Any] = {"chunks": len(manifest.chunks), "reused": 0, "bytes_upstream": 0,
                                 "bytes_peers": 0, "corrupt": []}
        self.chunks.mkdir(parents=True, exist_ok=True)
        first = {sha: i for i, sha in reversed(list(enumerate(manifest.chunks)))}  # a chunk twice: fetched once
        missing = await anyio.to_thread.run_sync(lambda: [i for i in first.values() if not self._have(manifest, i)])
        todo = sorted(missing)
        stats["reused"] = len(first) - len(todo)
        wanted = set(todo)
        held = [sha for sha, i in first.items() if i not in wanted]
        swarm = await self._join(args, held) if args["p2p"] and args["peer_key"] else None
        if swarm is not None:
            todo = await swarm.rarest_first(manifest, todo)
        limiter = anyio.CapacityLimiter(args["parallel"])
        pace = RateLimit(args["rate"])
        try:
            async with anyio.create_task_group() as tg:
                for index in todo:
                    tg.start_soon(self._get_chunk, manifest, index, limiter, stats, swarm, pace)
        except BaseExceptionGroup as group:
            failed = group.subgroup(TaskFailed)
            if failed is None:
                raise
            self.agent.executor._emit_text(task, "stderr", "".join(f"{c}\n" for c in stats["corrupt"]))
            raise failed.exceptions[0] from None
        path = await anyio.to_thread.run_sync(self._assemble, manifest, args["digest"])
        task.result = {"path": str(path), "size": manifest.size, "sha256": manifest.sha256,
                       "chunks": stats["chunks"], "reused": stats["reused"], "bytes_upstream": stats["bytes_upstream"],
                       "bytes_peers": stats["bytes_peers"], "corrupt": len(stats["corrupt"]),
                       "seconds": round(time.monotonic() - started, 3)}
        if stats["corrupt"]:
            self.agent.executor._emit_text(task, "stderr", "".join(f"{c}\n" for c in stats["corrupt"]))
        return "ok", 0

    async def _join(self, args: dict[str, Any], held: list[str]) -> Swarm | None:
        """Serve what we hold to peers of this release, and find peers; None without a tracker
        (an agent straight on the master) or when this agent does not take part."""
        port = 0
        if self.agent.peer is not None:  # with --no-peer it only takes from peers
            port = await self.agent.start_peer_server()
            self.agent.peer.keys.add(args["peer_key"])
        swarm = Swarm(self.agent.channel, args["peer_key"], port)
        return swarm if await swarm.announce(held) else None

    def _have(self, manifest: Manifest, index: int) -> bool:
        path = self.chunks / manifest.chunks[index]
        try:
            manifest.check_chunk(index, path.read_bytes())
        except (OSError, ManifestError):
            path.unlink(missing_ok=True)  # damaged on disk: fetch it again
            return False
        return True

    async def _get_chunk(self, manifest: Manifest, index: int, limiter: anyio.CapacityLimiter,
                         stats: dict[str, Any], swarm: Swarm | None, pace: RateLimit) -> None:
        """Peers first (spreading the load off the proxy), the upstream last; every copy is
        checked against the manifest, and a bad source is noted and skipped."""
        sha = manifest.chunks[index]
        async with limiter:
            for attempt in range(1, TRIES + 1):
                for source in (await swarm.peers(sha) if swarm else []) + ["upstream"]:
                    data = await self._from(source, sha, index, manifest.chunk_length(index), stats, swarm)
                    if data is None:
                        continue
                    try:
                        manifest.check_chunk(index, data)
                    except ManifestError as exc:
                        stats["corrupt"].append(f"corrupt chunk {index} from {source}: {exc}")
                        continue
                    await pace.take(len(data))
                    stats["bytes_upstream" if source == "upstream" else "bytes_peers"] += len(data)
                    await anyio.to_thread.run_sync(_write_atomic, self.chunks / sha, data)
                    if swarm is not None:
                        await swarm.announce([sha])
                    return
                await anyio.sleep(min(2 * attempt, 10))
        raise TaskFailed(f"chunk {index} could not be fetched intact from any source ({TRIES} rounds); "
                         "sources noted in stderr")

    async def _from(self, source: str, sha: str, index: int, size: int, stats: dict[str, Any],
                    swarm: Swarm | None) -> bytes | None:
        if source != "upstream":
            assert swarm is not None
            try:
                return await fetch_from_peer(source, sha, swarm.key, size=size)
            except (OSError, ValueError, TimeoutError) as exc:
                stats["corrupt"].append(f"peer {source} could not give chunk {index}: {exc}")
                return None
        channel = self.agent.channel
        try:
            resp = await channel.request("GET", f"/v1/blob?sha256={sha}&sid={channel.sid or ''}", timeout=300.0)
        except Exception as exc:
            stats["corrupt"].append(f"upstream could not give chunk {index}: {exc}")
            return None
        if resp.status_code != 200:
            stats["corrupt"].append(f"upstream answered {resp.status_code} for chunk {index}")
            return None
        return bytes(resp.content)

    def _assemble(self, manifest: Manifest, digest: str) -> Path:
        home = self.releases / digest[:16]
        home.mkdir(parents=True, exist_ok=True)
        final = home / manifest.name
        if final.is_file() and _sha256_file(final) == manifest.sha256:
            return final
        part = home / f".{manifest.name}.part"
        whole = hashlib.sha256()
        with open(part, "wb") as out:
            for sha in manifest.chunks:
                data = (self.chunks / sha).read_bytes()
                whole.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != manifest.sha256:
            part.unlink(missing_ok=True)
            raise TaskFailed(f"the assembled file has SHA-256 {whole.hexdigest()}, not {manifest.sha256}")
        part.replace(final)
        return final

    # -- place and rollback ---------------------------------------------------------------------
    async def place(self, task: Task) -> tuple[str, int | None]:
        args = validate(PLACE_ARGS, task.args)
        dest = self._dest(args["dest"])
        source = self._fetched(args["digest"])
        task.result = await anyio.to_thread.run_sync(_place, source, dest, args["mode"], args["digest"],
                                                     args["sha256"])
        return "ok", 0

    async def rollback(self, task: Task) -> tuple[str, int | None]:
        args = validate(ROLLBACK_ARGS, task.args)
        dest = self._dest(args["dest"])
        task.result = await anyio.to_thread.run_sync(_rollback, dest, args["digest"])
        return "ok", 0

    def _dest(self, text: str) -> Path:
        """``{hostname}`` and ``{uuid}`` in a destination are this agent's."""
        hostname = self.agent.hostname or socket.gethostname()
        return _dest(text.replace("{hostname}", hostname).replace("{uuid}", self.agent.ident.uuid))

    def _fetched(self, digest: str) -> Path:
        home = self.releases / digest[:16]
        files = [p for p in home.iterdir() if p.is_file() and not p.name.endswith(".part")] if home.is_dir() else []
        if not files:
            raise TaskFailed(f"release {digest[:16]} has not been fetched on this agent (run zy.release.fetch first)")
        return files[0]


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
    want = sha256 or _sha256_file(source)
    journal = _journal(dest)
    if dest.is_file() and _sha256_file(dest) == want:
        # already there: placed by this release before a restart (its journal says so), or not ours to undo
        ours = _read_journal(journal).get("digest") == digest
        return {"dest": str(dest), "sha256": want, "placed": ours, "unchanged": True}
    tmp = _copy_checked(source, dest.parent, f".{dest.name}.zy-new.", mode, want)
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
    _fsync_dir(dest.parent)
    return {"dest": str(dest), "sha256": want, "placed": True, "previous_kept": had}


def _rollback(dest: Path, digest: str) -> dict[str, Any]:
    journal = _journal(dest)
    entry = _read_journal(journal)
    if entry.get("digest") != digest:
        raise TaskFailed(f"{dest} was not placed by this release (nothing to roll back here)")
    if entry.get("prev") == "kept":
        prev = dest.with_name(dest.name + PREV_SUFFIX)
        if not prev.is_file():
            raise TaskFailed(f"the previous version of {dest} is gone ({prev} is missing)")
        os.replace(prev, dest)
        result: dict[str, Any] = {"dest": str(dest), "sha256": _sha256_file(dest), "restored": True}
    else:  # there was no file before the release: there is none after
        dest.unlink(missing_ok=True)
        result = {"dest": str(dest), "sha256": None, "restored": True, "removed": True}
    journal.unlink()
    _fsync_dir(dest.parent)
    return result


def _copy_checked(source: Path, directory: Path, prefix: str, mode: int, sha256: str) -> Path:
    """A copy under a fresh name (O_EXCL: no symlink planted in the directory is followed),
    whose bytes on disk are checked against ``sha256``."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        if _sha256_file(tmp) != sha256:
            raise TaskFailed(f"the copy of the release at {tmp} does not match its SHA-256: not placed")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _journal(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.zy-release")


def _read_journal(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = Path(tempfile.mktemp(dir=path.parent, prefix=f".{path.name}."))
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class Swarm:
    """This agent's view of a release's peers, through its proxy's tracker."""

    def __init__(self, channel: Any, key: str, port: int) -> None:
        self.channel = channel
        self.key = key
        self.port = port

    async def _call(self, path: str, body: dict[str, Any]) -> Any:
        resp = await self.channel.request("POST", f"{path}?sid={self.channel.sid or ''}",
                                          content=json.dumps(body).encode(),
                                          headers={"content-type": "application/json"}, timeout=30.0)
        return resp.json() if resp.status_code == 200 else None

    async def announce(self, chunks: list[str]) -> bool:
        """False when there is no tracker upstream (straight on the master)."""
        try:
            if not self.port:  # serves nobody: only ask whether there is a tracker
                return await self._call("/v1/tracker/lookup", {"chunks": []}) is not None
            return await self._call("/v1/tracker/announce", {"port": self.port, "chunks": chunks}) is not None
        except Exception:
            return False

    async def peers(self, sha: str) -> list[str]:
        try:
            found = await self._call("/v1/tracker/lookup", {"chunks": [sha], "max": 3})
        except Exception:
            return []
        return list((found or {}).get("peers", {}).get(sha, []))

    async def rarest_first(self, manifest: Manifest, todo: list[int]) -> list[int]:
        try:
            found = await self._call("/v1/tracker/lookup", {"chunks": [manifest.chunks[i] for i in todo], "max": 1})
        except Exception:
            found = None
        counts = (found or {}).get("counts", {})
        spread = {i: random.random() for i in todo}  # ties in random order, so peers start on different chunks
        return sorted(todo, key=lambda i: (counts.get(manifest.chunks[i], 0), spread[i]))
