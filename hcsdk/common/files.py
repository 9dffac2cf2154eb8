"""Replacing a file so a crash or a power cut leaves the old file or the new one, never half of
either: the new bytes go to a fresh temp file beside the target (created exclusively and without
following symlinks, so nothing planted in the directory is written through), are fsynced, and
the temp file is renamed over the target. The one copy of that dance for master, proxy and agent.

:func:`atomic_write` writes bytes or text held in memory; :func:`atomic_open` is the same as a
context manager for streaming writes (the file object it yields is the temp file; the rename
happens on a clean exit, the temp file goes away on an exception); :func:`atomic_open_async` is
that for an event loop, its open, writes, fsync and rename in worker threads (a download of
hundreds of MiB must not stall the loop while it reaches the disk).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from anyio import AsyncFile

__all__ = ["atomic_open", "atomic_open_async", "atomic_write", "fsync_dir"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o600, sync_dir: bool = False,
                 prefix: str | None = None, suffix: str = ".tmp") -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8). ``mode`` is the new file's
    permission bits as :func:`os.open` takes them (the umask applies; 0o600 by default: state files
    often hold secrets). ``sync_dir`` also fsyncs the directory so the rename itself survives a
    crash. ``prefix``/``suffix`` name the temp file (default ``.NAME.<random>.tmp``)."""
    with atomic_open(path, mode=mode, sync_dir=sync_dir, prefix=prefix, suffix=suffix) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, mode: int = 0o600, sync_dir: bool = False,
                prefix: str | None = None, suffix: str = ".tmp") -> Iterator[IO[bytes]]:
    """A context manager yielding the binary temp file that replaces ``path`` when the block ends
    cleanly; the arguments are :func:`atomic_write`'s. The caller may fchmod/fchown
    ``fh.fileno()`` inside the block: the fsync comes after it."""
    path = Path(path)
    tmp = path.with_name(f"{prefix if prefix is not None else f'.{path.name}.'}{secrets.token_hex(6)}{suffix}")
    fd = os.open(tmp, _FLAGS, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.asynccontextmanager
async def atomic_open_async(path: str | os.PathLike[str], *, mode: int = 0o600, sync_dir: bool = False,
                            prefix: str | None = None, suffix: str = ".tmp") -> AsyncIterator[AsyncFile[bytes]]:
    """:func:`atomic_open` for anyio code: yields the temp file as an ``anyio.AsyncFile``; the
    fsync and rename on a clean exit, or the removal on an exception (a cancellation included),
    run in a worker thread."""
    import anyio  # here: the rest of this module is for processes without an event loop too

    opened = atomic_open(path, mode=mode, sync_dir=sync_dir, prefix=prefix, suffix=suffix)
    # shielded: a cancellation arriving meanwhile must not leave the temp file behind (it is
    # delivered at the next checkpoint, in the body or after the rename)
    with anyio.CancelScope(shield=True):
        fh = await anyio.to_thread.run_sync(opened.__enter__)
    failure: BaseException | None = None
    try:
        yield anyio.wrap_file(fh)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(opened.__exit__, type(failure) if failure else None, failure,
                                           failure.__traceback__ if failure else None)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new name in ``directory`` durable; best effort (some filesystems and
    Windows refuse to open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
