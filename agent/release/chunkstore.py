"""Where an agent's release chunks are: inside the release files themselves.

A release is fetched into ``<state>/releases/<digest[:16]>/``: its manifest (``.zy-manifest.json``)
and the file, written there chunk by chunk at each chunk's offset (``.NAME.zy-part`` while it
comes, ``NAME`` once whole). Each byte is written once: no separate chunk files and no assembly
pass. This index says, for every chunk hash held, which file and offset has it, so peers are
served from the release files and a later release reuses the chunks an earlier one brought.

A finished release file may be the very inode placed at a destination (a hard link): it is
never written again. Readers check what they read against the manifest, so a file changed
behind the agent's back costs a refetch, never a bad copy.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path
from typing import Any

from hcsdk.protocol.manifest import Manifest, ManifestError
from hcsdk.protocol.names import digest_dir, is_digest_dir

from ..jsonfile import write_json

MANIFEST = ".zy-manifest.json"
PART_SUFFIX = ".zy-part"
#: the finished file's identity (inode, size, mtime) when it was last checked whole: while it
#: matches, nothing has written to the file since, and it need not be hashed again
VERIFIED = ".zy-verified.json"
_SYNC_FILE_RANGE_WRITE = 2


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._loaded = False
        self._lock = threading.Lock()

    def home(self, digest: str) -> Path:
        """Where release ``digest`` is kept; UnsafeName (a ValueError) unless it is a SHA-256."""
        return self.root / digest_dir(digest)

    def add(self, sha: str, path: Path, offset: int, length: int) -> None:
        with self._lock:
            self._where[sha] = (path, offset, length)

    def drop_file(self, path: Path) -> None:
        with self._lock:
            self._where = {sha: at for sha, at in self._where.items() if at[0] != path}

    def drop_dir(self, home: Path) -> None:
        with self._lock:
            self._where = {sha: at for sha, at in self._where.items() if at[0].parent != home}

    def moved(self, old: Path, new: Path) -> None:
        with self._lock:
            self._where = {sha: (new if at[0] == old else at[0], at[1], at[2]) for sha, at in self._where.items()}

    def locate(self, sha: str) -> tuple[Path, int, int] | None:
        """(file, offset, length) of chunk ``sha``, or None."""
        self._load()
        with self._lock:
            return self._where.get(sha)

    def read(self, sha: str) -> bytes | None:
        """The bytes held for chunk ``sha`` (unchecked: the reader checks), or None."""
        self._load()
        with self._lock:
            at = self._where.get(sha)
        if at is None:
            return None
        path, offset, length = at
        try:
            with open(path, "rb") as fh:
                data = os.pread(fh.fileno(), length, offset)
        except OSError:
            return None
        return data if len(data) == length else None

    def has(self, sha: str) -> bool:
        self._load()
        with self._lock:
            return sha in self._where

    def _load(self) -> None:
        """Index the finished release files on first use (after a restart)."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
        for meta in sorted(self.root.glob(f"*/{MANIFEST}")):
            manifest = read_manifest(meta) if is_digest_dir(meta.parent.name) else None
            if manifest is None:
                continue
            final = meta.parent / manifest.name
            if final.is_file() and final.stat().st_size == manifest.size:
                for index, sha in enumerate(manifest.chunks):
                    with self._lock:
                        self._where.setdefault(sha, (final, index * manifest.chunk_size, manifest.chunk_length(index)))


def mark_verified(final: Path, sha256: str) -> None:
    write_json(final.parent / VERIFIED, {**_identity(final), "sha256": sha256})


def verified_sha256(final: Path) -> str | None:
    """The SHA-256 ``final`` was checked to have, if it is unchanged since."""
    try:
        record = json.loads((final.parent / VERIFIED).read_text())
        same = {k: record.get(k) for k in ("dev", "ino", "size", "mtime_ns")} == _identity(final)
    except (OSError, ValueError, AttributeError):
        return None
    return str(record.get("sha256")) if same else None


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range to disk now, without waiting (sync_file_range), so the fsync when
    the file is placed finds little left to do; a no-op where the call is missing."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _libc_sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()


def read_manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, ManifestError):
        return None
