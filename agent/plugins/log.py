"""``log.tail``: the last lines of a log file, then the lines appended to it, like ``tail -F``.

Paths follow ``file.read``'s rules (``agent.plugins.file.check_path``), checked again each time
the file is reopened after a rotation.

Lines are newline-terminated; while following, a line still being written is held back until
its newline comes (or the tail ends: then it is sent as it is). Each line is sent with a
trailing newline, lines read together in one ``ctx.out`` call. ``pattern`` keeps only lines
containing it (a regular expression with ``regex``); the last ``lines`` lines are the last that
match, looked for within the last 64 MiB of the file.

Following notices rotation: the path naming another file (rename and create, a new symlink
target) makes the tail finish the old file and start the new one from its beginning; the file
getting shorter (truncation, ``copytruncate``) starts it again from the beginning. Each counts
in ``rotations``. A path that is briefly missing is waited for.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

from agent.plugins.api import Arg, Context, PluginError, command
from agent.plugins.file import check_path, open_regular, os_error

VERSION = "1.0"

POLL = 0.2
BLOCK = 64 * 1024
MAX_SCAN = 64 * 1024 * 1024  # how far back the last lines are looked for
READ_PER_POLL = 4 * 1024 * 1024  # then check for cancel before reading on
MAX_LINE = 1024 * 1024  # a longer "line" is sent in pieces, so memory stays bounded
PIECE = 64 * 1024  # characters per ctx.out call


def _matcher(pattern: str, regex: bool) -> Callable[[str], bool]:
    if not pattern:
        return lambda line: True
    if not regex:
        return lambda line: pattern in line
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise PluginError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
    return lambda line: compiled.search(line) is not None


def _decode(line: bytes) -> str:
    return line.decode("utf-8", "replace")


def _after_last_newline(fd: int, size: int) -> int:
    """The offset just after the file's last newline (where a last, unfinished line starts)."""
    pos = size
    while pos > 0 and size - pos < MAX_SCAN:
        start = max(0, pos - BLOCK)
        found = os.pread(fd, pos - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        pos = start
    return pos


def _last_lines(ctx: Context, fd: int, end: int, count: int, keep: Callable[[str], bool]) -> list[str]:
    """The last ``count`` lines before ``end`` (just after a newline) that ``keep`` accepts."""
    found: list[str] = []  # newest first
    pos, carry = end, b""  # carry: the start of a line whose end was in the block after
    while pos > 0 and len(found) < count and end - pos < MAX_SCAN and not ctx.stopping:
        start = max(0, pos - BLOCK)
        pieces = (os.pread(fd, pos - start, start) + carry).split(b"\n")
        if pos == end:
            pieces.pop()  # the empty piece after the last newline
        carry = pieces.pop(0) if start > 0 else b""
        for raw in reversed(pieces):
            line = _decode(raw)
            if keep(line):
                found.append(line)
                if len(found) == count:
                    break
        pos = start
    return found[::-1]


class _Tail:
    """One followed path: the open file, where we are in it, the unfinished line."""

    def __init__(self, ctx: Context, path: str, keep: Callable[[str], bool]) -> None:
        self.ctx, self.path, self.keep = ctx, path, keep
        self.fd = open_regular(path, check_path(path))
        st = os.fstat(self.fd)
        self.ident = (st.st_dev, st.st_ino)
        self.size = st.st_size
        self.pos = 0
        self.partial = b""
        self.sent = 0
        self.rotations = 0

    def close(self) -> None:
        os.close(self.fd)

    def send(self, lines: list[str]) -> None:
        """Send lines, several per ctx.out call."""
        batch: list[str] = []
        length = 0
        for line in lines:
            if length + len(line) + 1 > PIECE and batch:
                self.ctx.out("".join(batch))
                batch, length = [], 0
            batch.append(line + "\n")
            length += len(line) + 1
        self.ctx.out("".join(batch))
        self.sent += len(lines)

    def start(self, count: int, follow: bool) -> None:
        """Send the last ``count`` lines; following goes on from the last complete one."""
        cut = _after_last_newline(self.fd, self.size)
        unfinished = "" if follow else _decode(os.pread(self.fd, self.size - cut, cut))
        last = bool(unfinished) and count > 0 and self.keep(unfinished)
        lines = _last_lines(self.ctx, self.fd, cut, count - last, self.keep) if count - last > 0 else []
        self.send(lines + [unfinished] * last)
        self.pos = cut if follow else self.size

    def poll(self) -> bool:
        """Send what was appended; notice rotation and truncation. False if nothing happened."""
        if self._read_new():
            return True
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # mid-rotation, or gone for now: keep what we have, look again
        if (st.st_dev, st.st_ino) != self.ident:
            return self._reopen()
        if os.fstat(self.fd).st_size < self.pos:
            self._restart("was truncated")
            return True
        return False

    def finish(self) -> None:
        """Send the unfinished line, if any (the tail ends, or the file is done with)."""
        if self.partial:
            line = _decode(self.partial)
            self.partial = b""
            if self.keep(line):
                self.send([line])

    def _read_new(self) -> bool:
        got = 0
        while got < READ_PER_POLL:
            try:
                data = os.pread(self.fd, BLOCK, self.pos)
            except OSError as exc:
                raise os_error(self.path, exc, "read") from None
            if not data:
                break
            self.pos += len(data)
            got += len(data)
            self._take(data)
        return got > 0

    def _take(self, data: bytes) -> None:
        buffer = self.partial + data
        cut = buffer.rfind(b"\n") + 1
        self.partial = buffer[cut:]
        lines = [_decode(raw) for raw in buffer[:cut].split(b"\n")[:-1]] if cut else []
        if len(self.partial) > MAX_LINE:
            lines.append(_decode(self.partial))
            self.partial = b""
        self.send([line for line in lines if self.keep(line)])

    def _reopen(self) -> bool:
        """The path names another file now: finish the old one, then start on the new."""
        try:
            fd = open_regular(self.path, check_path(self.path))
        except PluginError as exc:
            if os.path.lexists(self.path) and "no such file" not in str(exc):
                raise  # there is something else there now, and the rules or its type refuse it
            return False
        self._read_new()  # what was written to the old file before it was renamed
        self.finish()
        os.close(self.fd)
        self.fd = fd
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)
        self._restart("was replaced")
        return True

    def _restart(self, what: str) -> None:
        self.pos, self.partial = 0, b""
        self.rotations += 1
        self.ctx.err(f"log.tail: {self.path} {what}; following it from its start\n")


@command("log.tail", streams=True, args={
    "path": Arg(str, help="absolute path of the log file"),
    "lines": Arg(int, default=10, min=0, max=100000, help="send the last N (matching) lines first"),
    "follow": Arg(bool, default=True, help="then send the lines appended, across rotations"),
    "for_seconds": Arg(float, default=0.0, min=0, help="stop following after this long (0: until cancelled)"),
    "pattern": Arg(str, default="", help="only lines containing this"),
    "regex": Arg(bool, default=False, help="pattern is a regular expression"),
})
def tail(ctx: Context, path: str, lines: int, follow: bool, for_seconds: float, pattern: str,
         regex: bool) -> dict[str, object]:
    """Send a log file's last lines, then follow it like tail -F."""
    keep = _matcher(pattern, regex)
    deadline = time.monotonic() + for_seconds if for_seconds > 0 else None
    state = _Tail(ctx, path, keep)
    try:
        state.start(lines, follow)
        while follow and not ctx.stopping:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if not state.poll():
                ctx.sleep(POLL if remaining is None else min(POLL, remaining))
        state.finish()
    finally:
        state.close()
    return {"path": path, "lines": state.sent, "rotations": state.rotations}
