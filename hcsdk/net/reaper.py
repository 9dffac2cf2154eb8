"""Closes connections that never authenticate (issue 13, hole 5).

granian bounds how long an HTTP/1 request head may take, but not a TLS connection that
completes its handshake (ALPN h2 or http/1.1) and then sends nothing: each such connection
holds ~10 KiB and one file descriptor forever. Nothing at the ASGI level ever sees it, so the
reaper looks at the process's own sockets (/proc/self/fd, /proc/self/net/tcp{,6}) and shuts
down, from outside granian, accepted connections that no request has authenticated on:
those older than ``grace``, and per source address the oldest beyond ``per_address``.

A request marks its connection as authenticated through ``hcsdk.net.limits.authenticated``
(the scope carries ``self.mark`` under ``REAPER_KEY``); an authenticated connection (an
agent's h2 channel, an SDK keep-alive) is never cut. Outbound connections are never touched:
only sockets whose local port is the listening port count. Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from hcsdk.net.asgi import Receive, Scope, Send

__all__ = ["REAPER_KEY", "ConnectionReaper", "Conn", "scan_connections"]

log = logging.getLogger("zy.reaper")

#: the scope key under which the reaper leaves its ``mark`` for ``authenticated``
REAPER_KEY = "zy.reaper_mark"
#: TCP states of an accepted connection that still holds an fd: ESTABLISHED, CLOSE_WAIT
_LIVE_STATES = {"01", "08"}
#: the pause between scans is at least this many times the last scan's duration: with 10,000
#: agents a scan takes about 165 ms here (63 of them the kernel printing /proc/net/tcp), so the
#: reaper keeps to 2.5% of a core and an idle connection is cut within grace + about 7 s
SCAN_SHARE = 40.0

App = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Conn:
    """One accepted TCP connection of this process."""

    inode: int
    fd: int
    peer: str
    peer_port: int


def _norm(address: str) -> str:
    """IPv4-mapped IPv6 as plain IPv4, so marks and /proc entries compare equal."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _socket_fds() -> dict[int, int]:
    """inode -> fd for this process's sockets."""
    out: dict[int, int] = {}
    fd_dir = Path("/proc/self/fd")
    for entry in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / entry)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            out[int(target[8:-1])] = int(entry)
    return out


def _hex_address(text: str) -> str:
    """/proc/net/tcp addresses are 32-bit words in host byte order, printed in hex."""
    words = [int(text[i:i + 8], 16) for i in range(0, len(text), 8)]
    raw = b"".join(struct.pack("=I", w) for w in words)
    return _norm(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw))


def scan_connections(port: int) -> dict[int, str]:
    """This process's namespace's live accepted connections on local ``port``: inode -> the
    peer's address as /proc prints it (decoded only for those the reaper does not know yet)."""
    found: dict[int, str] = {}
    # the tables list every socket of the network namespace (with 10,000 agents, and their
    # other sockets, tens of thousands of lines): lines of other local ports are skipped on a
    # substring test before any split
    local_port = f":{port:04X} "
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            if local_port not in line:
                continue
            cols = line.split()
            if len(cols) < 10 or cols[3] not in _LIVE_STATES:
                continue
            if int(cols[1].rsplit(":", 1)[1], 16) == port:  # not an outbound connection to the port
                found[int(cols[9])] = cols[2]
    return found


def _peer(remote: str) -> tuple[str, int]:
    peer_hex, peer_port = remote.rsplit(":", 1)
    return _hex_address(peer_hex), int(peer_port, 16)


def _with_fds(doomed: dict[int, tuple[str, int]]) -> list[Conn]:
    """The doomed connections this process holds, with their fds (read only when some are doomed:
    reading every socket's fd link was a third of an idle scan with 10,000 agents)."""
    fds = _socket_fds()
    return [Conn(inode, fds[inode], *peer) for inode, peer in doomed.items() if inode in fds]


def cut(conn: Conn) -> bool:
    """Shut ``conn`` down (granian then sees EOF and closes its fd). Through a dup checked to
    be the same socket, in case the fd was closed and reused since the scan."""
    try:
        dup = os.dup(conn.fd)
    except OSError:
        return False
    try:
        same = os.fstat(dup).st_ino == conn.inode
    except OSError:
        same = False
    if not same:
        os.close(dup)
        return False
    sock = socket.socket(fileno=dup)  # owns the dup from here: closing it twice could hit a reused fd
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
    finally:
        sock.close()
    return True


class ConnectionReaper:
    """Cuts accepted connections nobody authenticated on. ``wrap`` the ASGI app, then
    ``run(port)`` in the server's task group once the port is bound."""

    def __init__(self, grace: float = 45.0, per_address: int = 256, interval: float = 2.0) -> None:
        self.grace = grace
        self.per_address = per_address
        self.interval = interval
        self._marks: dict[tuple[str, int], float] = {}
        self._authed: set[int] = set()
        self._first_seen: dict[int, float] = {}
        #: inode -> (peer address, port) of connections not known to be authenticated
        self._peers: dict[int, tuple[str, int]] = {}
        self.cut_count = 0

    def wrap(self, app: App) -> App:
        async def marked(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                scope[REAPER_KEY] = self.mark
            await app(scope, receive, send)

        return marked

    def mark(self, scope: Scope) -> None:
        """The request on this connection authenticated: never cut the connection."""
        client = scope.get("client")
        if client:
            self._marks[(_norm(str(client[0])), int(client[1]))] = time.monotonic()

    async def run(self, port: int) -> None:
        if not sys.platform.startswith("linux") or self.grace <= 0:
            return  # not Linux, or disabled
        took = 0.0
        while True:
            # a scan holds the GIL for most of its run: with tens of thousands of sockets it took
            # up to a second, and every two seconds that starved the handshakes of a reconnect
            # storm; the pause grows with the scan (SCAN_SHARE)
            await anyio.sleep(max(self.interval, SCAN_SHARE * took))
            start = time.monotonic()
            live = await anyio.to_thread.run_sync(scan_connections, port)
            took = time.monotonic() - start
            doomed = self.select(live, start)
            if doomed:
                done = await anyio.to_thread.run_sync(_cut_all, doomed)
                self.cut_count += done
                log.info("closed %d connections that did not authenticate", done)

    def select(self, live: dict[int, str], start: float) -> list[Conn]:
        """Update what is known from one scan taken at ``start`` (inode -> peer, as /proc has it);
        the connections to cut. Authenticated connections cost a set lookup: only the others'
        addresses are decoded (once each), so an idle scan of 10,000 agents stays cheap."""
        self._authed &= live.keys()
        self._first_seen = {i: t for i, t in self._first_seen.items() if i in live}
        self._peers = {i: p for i, p in self._peers.items() if i in live}
        unknown = [i for i in live if i not in self._authed]
        for inode in unknown:
            if inode not in self._peers:
                self._peers[inode] = _peer(live[inode])
        by_peer = {self._peers[i]: i for i in unknown}
        for key, stamp in list(self._marks.items()):
            marked = by_peer.get(key)
            if marked is not None:
                self._authed.add(marked)
                del self._marks[key]
            elif stamp < start:
                del self._marks[key]  # its connection is gone already (or known already)
        for inode in unknown:
            self._first_seen.setdefault(inode, start)
        pending = sorted((i for i in unknown if i not in self._authed), key=lambda i: self._first_seen[i])
        doomed = {i: self._peers[i] for i in pending if start - self._first_seen[i] > self.grace}
        per: dict[str, list[int]] = {}
        for i in pending:
            per.setdefault(self._peers[i][0], []).append(i)
        for group in per.values() if self.per_address > 0 else ():
            for i in group[:max(0, len(group) - self.per_address)]:  # the oldest ones
                doomed[i] = self._peers[i]
        return _with_fds(doomed) if doomed else []


def _cut_all(conns: list[Conn]) -> int:
    return sum(cut(c) for c in conns)

