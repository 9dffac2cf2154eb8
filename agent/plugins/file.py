"""``file.read`` and ``file.write``: read a file's bytes (streamed as text or base64) and replace
or append to a file, under the path rules every bundled plugin that touches files follows.

The path rules (:func:`check_path`), in order; an error names the path and the rule:

* the path must be absolute and contain no NUL byte;
* no ``..`` component (``/srv/app/../x`` is refused, not normalised away);
* what it resolves to (``os.path.realpath``: every symlink followed) must not be under
  ``/proc``, ``/sys`` or ``/dev``;
* and must be under one of the directories in ``ZY_FILE_ROOTS`` (``os.pathsep``-separated
  absolute directories, themselves resolved; unset or empty means ``/``, everything). A symlink
  inside a root that points outside it is refused.

The file is then opened by its resolved path, with ``O_NOFOLLOW`` on the last component. Only
regular files are read or written (no FIFOs, devices or directories).

``file.read`` reads at most ``max_bytes`` from ``offset``: a bigger file is not an error, the
result says ``truncated`` and stderr says which ``offset`` reads on. ``file.write`` refuses
content over ``max_bytes``. Replacing is atomic (a temporary file in the same directory, fsync,
rename): a failed write leaves the old file as it was and no temporary file behind.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import os
import stat

from agent.plugins.api import Arg, Context, PluginError, command
from hcsdk.common.files import atomic_open, fsync_dir

__all__ = ["allowed_roots", "check_path", "human_size", "open_regular", "os_error", "read", "write"]

VERSION = "1.0"

KiB = 1024
MiB = 1024 * KiB
#: bytes per ctx.out piece: 64 Ki characters of text, or 48 KiB that base64 makes 64 Ki characters
TEXT_PIECE = 64 * KiB
B64_PIECE = 48 * KiB
MAX_BYTES = 16 * MiB
ROOTS_ENV = "ZY_FILE_ROOTS"
SYSTEM_DIRS = ("/proc", "/sys", "/dev")


# -- path rules --------------------------------------------------------------------------------

def allowed_roots() -> list[str]:
    """The resolved directories of ``ZY_FILE_ROOTS`` (read on every call); relative entries are
    ignored, an unset or empty variable means ``/``."""
    raw = os.environ.get(ROOTS_ENV, "").strip() or "/"
    return [os.path.realpath(root) for root in raw.split(os.pathsep) if os.path.isabs(root)]


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_path(path: str) -> str:
    """The resolved path ``path`` names, if it passes the rules; :class:`PluginError` naming
    the path and the rule otherwise."""

    def refused(rule: str, real: str | None = None) -> PluginError:
        really = f" (resolves to {real!r})" if real is not None and real != path else ""
        return PluginError(f"path {path!r}{really} is not allowed: {rule}")

    if "\0" in path:
        raise refused("it contains a NUL byte")
    if not os.path.isabs(path):
        raise refused("it must be absolute")
    if ".." in path.split("/"):
        raise refused("'..' components are refused")
    real = os.path.realpath(path)
    for system in SYSTEM_DIRS:
        if _under(real, system):
            raise refused(f"files under {system} are never served", real)
    roots = allowed_roots()
    if not any(_under(real, root) for root in roots):
        shown = os.pathsep.join(roots) or "no usable directory"
        raise refused(f"it is outside {ROOTS_ENV} ({shown})", real)
    return real


def os_error(path: str, exc: OSError, doing: str) -> PluginError:
    """An OSError as a message that names the path."""
    if isinstance(exc, FileNotFoundError):
        return PluginError(f"cannot {doing} {path!r}: no such file or directory")
    if isinstance(exc, PermissionError):
        return PluginError(f"cannot {doing} {path!r}: permission denied")
    return PluginError(f"cannot {doing} {path!r}: {exc.strerror or exc}")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str, real: str) -> int:
    """A read-only descriptor on the regular file ``real`` (``path`` as the caller gave it, for
    messages). Non-blocking open, so a FIFO cannot hang us before it is refused."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise os_error(path, exc, "read") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise PluginError(f"cannot read {path!r}: it is {_kind(mode)}")
    return fd


def human_size(n: float) -> str:
    """``16 MiB``, ``20.5 MiB``, ``300 bytes``."""
    for unit, name in ((1024 * MiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            value = n / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{int(n)} bytes"


# -- file.read ---------------------------------------------------------------------------------

class _Utf8:
    """Bytes to text for ctx.out across pieces: invalid bytes show as U+FFFD, noticed once."""

    def __init__(self) -> None:
        self._strict = codecs.getincrementaldecoder("utf-8")()
        self._lenient = codecs.getincrementaldecoder("utf-8")("replace")
        self.invalid = False

    def decode(self, data: bytes, final: bool, complete: bool) -> str:
        if not self.invalid:
            try:
                self._strict.decode(data, final and complete)
            except UnicodeDecodeError:
                self.invalid = True
        return self._lenient.decode(data, final)


@command("file.read", args={
    "path": Arg(str, help="absolute path of a regular file"),
    "max_bytes": Arg(int, default=MiB, min=1, max=MAX_BYTES, help="read at most this much (16 MiB at most)"),
    "offset": Arg(int, default=0, min=0, help="start at this byte"),
    "encoding": Arg(str, default="utf-8", choices=("utf-8", "base64"), help="base64 for binary files"),
})
def read(ctx: Context, path: str, max_bytes: int, offset: int, encoding: str) -> dict[str, object]:
    """Stream a file's content (at most max_bytes from offset) as UTF-8 text or base64."""
    real = check_path(path)
    fd = open_regular(path, real)
    try:
        size = os.fstat(fd).st_size
        want = max(0, min(max_bytes, size - offset))
        done, digest = _stream(ctx, path, fd, offset, want, offset + want >= size, encoding)
    finally:
        os.close(fd)
    truncated = offset + done < size
    if truncated and not ctx.stopping:
        ctx.err(f"file.read: read {human_size(done)} of {path!r} ({human_size(size)}) from offset {offset}; "
                f"max_bytes={human_size(max_bytes)}: pass offset={offset + done} for the rest\n")
    return {"path": path, "size": size, "read": done, "truncated": truncated, "sha256": digest}


def _stream(ctx: Context, path: str, fd: int, offset: int, want: int, to_end: bool,
            encoding: str) -> tuple[int, str]:
    """Send ``want`` bytes from ``offset`` in ≤ 64 Ki-character pieces; (bytes read, sha256).
    ``to_end``: they reach the end of the file (a character cut there is the file's fault)."""
    digest = hashlib.sha256()
    text = _Utf8() if encoding == "utf-8" else None
    piece = TEXT_PIECE if text is not None else B64_PIECE
    done = 0
    while done < want and not ctx.stopping:
        try:
            data = os.pread(fd, min(piece, want - done), offset + done)
        except OSError as exc:
            raise os_error(path, exc, "read") from None
        if not data:  # the file shrank while we read
            break
        done += len(data)
        digest.update(data)
        last = done >= want
        if text is not None:
            ctx.out(text.decode(data, final=last, complete=to_end))
        else:
            ctx.out(base64.b64encode(data).decode("ascii"))
    if text is not None and text.invalid:
        ctx.err(f"file.read: {path!r} is not valid UTF-8 (bad bytes shown as U+FFFD); "
                "use encoding='base64' for binary files\n")
    return done, digest.hexdigest()


# -- file.write --------------------------------------------------------------------------------

@command("file.write", args={
    "path": Arg(str, help="absolute path of the file to write"),
    "content": Arg(str, help="the new content (text, or base64 with encoding=base64)"),
    "encoding": Arg(str, default="utf-8", choices=("utf-8", "base64")),
    "mode": Arg(int, default=0o644, min=0, max=0o7777,
                help="permission bits of a new file (420 is 0o644); a replaced file keeps its own"),
    "append": Arg(bool, default=False, help="append instead of replacing (not atomic)"),
    "max_bytes": Arg(int, default=MAX_BYTES, min=0, max=MAX_BYTES, help="refuse content bigger than this"),
    "make_dirs": Arg(bool, default=False, help="create missing parent directories"),
})
def write(ctx: Context, path: str, content: str, encoding: str, mode: int, append: bool, max_bytes: int,
          make_dirs: bool) -> dict[str, object]:
    """Replace a file atomically (or append to it) with the given content."""
    data = _content_bytes(content, encoding)
    if len(data) > max_bytes:
        raise PluginError(f"content is {human_size(len(data))}; file.write writes at most "
                          f"max_bytes={human_size(max_bytes)} (to {path!r})")
    real = check_path(path)
    _ensure_parent(path, os.path.dirname(real), make_dirs)
    real = check_path(path)  # again: the directories just made must not have let a symlink in
    existing = _existing(path, real)
    if append:
        size = _append(path, real, data, mode, existing)
    else:
        _replace(path, real, data, mode, existing)
        size = len(data)
    return {"path": path, "size": size, "written": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _content_bytes(content: str, encoding: str) -> bytes:
    if encoding == "utf-8":
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PluginError(f"content is not valid text (a lone surrogate at character {exc.start}); "
                              "send binary content with encoding='base64'") from None
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PluginError(f"content is not valid base64: {exc}") from None


def _ensure_parent(path: str, parent: str, make_dirs: bool) -> None:
    if os.path.isdir(parent):
        return
    if os.path.lexists(parent):
        raise PluginError(f"cannot write {path!r}: {parent!r} is not a directory")
    if not make_dirs:
        raise PluginError(f"cannot write {path!r}: directory {parent!r} does not exist (make_dirs=true creates it)")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise os_error(parent, exc, "create directory") from None


def _existing(path: str, real: str) -> os.stat_result | None:
    """The stat of the file being replaced, None if there is none; refuses a non-regular one."""
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error(path, exc, "write") from None
    if not stat.S_ISREG(st.st_mode):
        raise PluginError(f"cannot write {path!r}: it is {_kind(st.st_mode)}")
    return st


def _set_owner_mode(fd: int, existing: os.stat_result | None, mode: int) -> None:
    """A replaced file keeps its owner (when we may) and mode; a new one gets ``mode`` exactly."""
    if existing is not None:
        for uid in (existing.st_uid, -1):  # owner and group, else the group alone
            try:
                os.fchown(fd, uid, existing.st_gid)
                break
            except OSError:
                continue
        mode = stat.S_IMODE(existing.st_mode)
    os.fchmod(fd, mode)  # after fchown, which may clear setuid bits


def _replace(path: str, real: str, data: bytes, mode: int, existing: os.stat_result | None) -> None:
    try:
        with atomic_open(real, prefix=f".{os.path.basename(real)}.", suffix=".zytmp", sync_dir=True) as out:
            out.write(data)
            out.flush()
            _set_owner_mode(out.fileno(), existing, mode)
    except OSError as exc:
        raise os_error(path, exc, "write") from None


def _append(path: str, real: str, data: bytes, mode: int, existing: os.stat_result | None) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(real, flags, mode)
    except OSError as exc:
        raise os_error(path, exc, "append to") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # raced with something else appearing there
            raise PluginError(f"cannot append to {path!r}: it is not a regular file")
        if existing is None:
            os.fchmod(fd, mode)  # the umask does not get a say in a mode asked for
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise os_error(path, exc, "append to") from None
    finally:
        os.close(fd)
    if existing is None:
        fsync_dir(os.path.dirname(real))
    return size


