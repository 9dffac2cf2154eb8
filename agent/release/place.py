"""Placing a fetched release at its destination, and rolling it back.

The file goes to ``dest`` atomically: a hard link (a copy across filesystems) under a fresh temp
name in the destination's directory, checked, fsynced, then renamed over ``dest``. What was there
is kept as ``dest.zy-prev`` (hard-linked first, so ``dest`` is never missing), and a journal
beside it (``.dest.zy-release``) says which release placed it, so a rollback undoes only its own
release and a repeated one finishes the job or finds it done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from hcsdk.common.files import fsync_dir

from ..executor import TaskFailed
from ..jsonfile import write_json
from ..plugins.api import PluginError
from ..plugins.file import check_path
from .chunkstore import verified_sha256

__all__ = ["PREV_SUFFIX", "checked_dest", "place", "rollback", "sha256_file"]

PREV_SUFFIX = ".zy-prev"


def checked_dest(text: str) -> Path:
    """``text`` as a destination: a path the file plugin's rules allow, in a directory that exists."""
    try:
        check_path(text)
    except PluginError as exc:
        raise TaskFailed(str(exc)) from None
    dest = Path(text)
    if not dest.parent.is_dir():
        raise TaskFailed(f"cannot place {dest}: its directory {dest.parent} does not exist")
    return dest


def place(source: Path, dest: Path, mode: int, digest: str, sha256: str) -> dict[str, Any]:
    """Put ``source`` at ``dest`` atomically, keeping what was there for a rollback, and note
    in a journal beside it which release did so (a rollback undoes only its own release)."""
    trusted = bool(sha256) and verified_sha256(source) == sha256  # checked whole, unchanged since
    want = sha256 or sha256_file(source)
    journal = _journal(dest)
    if dest.is_file() and ((trusted and os.path.samefile(dest, source)) or sha256_file(dest) == want):
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


def rollback(dest: Path, digest: str) -> dict[str, Any]:
    """Put back what the release replaced. The journal says "rolled back" before the file moves,
    so asking again (a master restarted mid-rollback) finishes the job or finds it done."""
    journal = _journal(dest)
    entry = _read_journal(journal)
    if entry.get("digest") != digest:
        raise TaskFailed(f"{dest} was not placed by this release (nothing to roll back here)")
    prev = dest.with_name(dest.name + PREV_SUFFIX)
    kept = entry.get("prev") == "kept"
    if entry.get("rolled_back") and not (kept and prev.is_file()):
        return {"dest": str(dest), "sha256": sha256_file(dest) if dest.is_file() else None, "restored": True,
                "already": True}
    if kept and not prev.is_file():
        raise TaskFailed(f"the previous version of {dest} is gone ({prev} is missing)")
    write_json(journal, {**entry, "rolled_back": True})
    if kept:
        os.replace(prev, dest)
        result: dict[str, Any] = {"dest": str(dest), "sha256": sha256_file(dest), "restored": True}
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
        if not trusted and sha256_file(tmp) != sha256:
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
