"""Serving an ASGI app the way master and proxy both do: granian embedded in the caller's
event loop, TLS with ALPN (h2 unless refused), limits set for long-lived channels, the real
port read back after binding, a data directory held by one process at a time."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Any

import anyio

__all__ = ["StartupError", "bound_port", "check_port_free", "granian_server", "lock_dir", "parse_listen",
           "server_names", "stop_server"]


class StartupError(Exception):
    """A service cannot start; the message says why and what to do."""


MAX_CONNECTIONS = 65_536


#: HTTP/1 request heads must be in within this many seconds (granian closes the connection)
HEADER_TIMEOUT = 10.0
#: the largest HTTP/2 header block a client may send (granian's default is 16 MiB per stream)
MAX_HEADERS = 64 * 1024


def granian_server(app: Any, host: str, port: int, cert: Path, key: Path, *, http2: bool, heartbeat: float,
                   dead_after: float, header_timeout: float = HEADER_TIMEOUT) -> Any:
    from granian.constants import HTTPModes, Interfaces, SSLProtocols
    from granian.http import HTTP1Settings, HTTP2Settings
    from granian.server.embed import Server

    # Long-lived channels: HTTP/2 PINGs (sent and answered by granian, without Python) keep NATs
    # from dropping idle connections and find dead peers: a peer silent for `heartbeat` is
    # pinged, and dropped if the answer is not back in time, so within `dead_after` in all.
    # The stream limit leaves room for the two channel streams plus API use.
    h2 = HTTP2Settings(
        keep_alive_interval=int(heartbeat * 1000),
        keep_alive_timeout=max(1, int(dead_after - heartbeat - 1)),
        max_concurrent_streams=256,
        initial_connection_window_size=4 * 1024 * 1024,
        initial_stream_window_size=1024 * 1024,
        # nobody's headers are big: a client must not park megabytes in them before any check
        max_headers_size=MAX_HEADERS,
    )
    # a deadline on the request head: a client that opens a connection and trickles its
    # headers holds nothing for long (bodies get theirs from the handlers: hcsdk.net.limits)
    h1 = HTTP1Settings(header_read_timeout=max(1, int(header_timeout * 1000)), keep_alive=True)
    return Server(
        app, address=host, port=port, interface=Interfaces.ASGINL,
        http=HTTPModes.auto if http2 else HTTPModes.http1,
        http1_settings=h1, http2_settings=h2, backlog=4096,
        # granian's default caps concurrent connections at the backlog (4,096): a channel is a
        # connection held for days, so the cap must be the fleet size, not a burst size
        backpressure=MAX_CONNECTIONS,
        ssl_cert=cert.resolve(), ssl_key=key.resolve(),
        # TLS 1.2 too: corporate middleboxes between hops often speak nothing newer
        ssl_protocol_min=SSLProtocols.tls12,
        log_enabled=False, websockets=False,
    )


async def stop_server(server: Any, grace: float = 5.0) -> None:
    """Stop an embedded granian server (it closes connections with GOAWAY) and wait for it."""
    server.interrupt_signal = True
    server.main_loop_interrupt.set()
    with anyio.move_on_after(grace):
        while server.wrks:  # noqa: ASYNC110 - granian exposes no event for this
            await anyio.sleep(0.05)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for --listen (an empty host means all addresses)."""
    import argparse

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def bound_port(timeout: float = 10.0) -> int:
    """The port this process listens on (for --listen HOST:0)."""
    import psutil

    me = psutil.Process(os.getpid())
    with anyio.fail_after(timeout):
        while True:
            for conn in me.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    return int(conn.laddr.port)
            await anyio.sleep(0.02)


def check_port_free(host: str, port: int) -> None:
    # granian binds with SO_REUSEPORT, so a second server on a taken port would silently share
    # it with the first. A plain bind without that option tells the truth.
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror} (already in use?)") from None


def lock_dir(root: Path, what: str) -> Any:
    """Hold ``root/<what>.lock`` for the life of the process; refuse if another process does."""
    root.mkdir(parents=True, exist_ok=True)
    fh = open(root / f"{what}.lock", "a+")  # held for the life of the process
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        raise StartupError(f"another {what} is running on {root} (pid {fh.read().strip() or '?'})") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def server_names(host: str, extra: list[str]) -> list[str]:
    """Names the server certificate covers: the listen host, advertised hosts, localhost, and
    this host's name and addresses (what agents use when the master listens on 0.0.0.0)."""
    names = [n for n in [host, *extra] if n and n not in ("0.0.0.0", "::")]
    hostname = socket.gethostname()
    try:
        addrs = socket.gethostbyname_ex(hostname)[2]
    except OSError:
        addrs = []
    return list(dict.fromkeys([*names, "localhost", "127.0.0.1", "::1", hostname, *addrs]))
