"""Runs the master: granian (embedded, in this process's event loop) serving the ASGI app,
next to the hub's background work. One process holds the agent sessions, so one worker."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import sys
from typing import Any

import anyio
import psutil
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings, HTTP2Settings
from granian.server.embed import Server

from .api import BodyLimit, build_api
from .asgi import error
from .bootstrap import Paths, ensure_admin_token, ensure_e2e_key, ensure_pki, server_names, write_client_configs
from .channel import ChannelApp
from .db import Db
from .hub import Hub
from .settings import MasterSettings
from .store import Store

log = logging.getLogger("zy.master")


def build_app(hub: Hub, paths: Paths, urls: list[str], e2e_private: bytes) -> Any:
    channel = ChannelApp(hub, paths, e2e_private)
    api = BodyLimit(build_api(hub, paths, urls, e2e_private), hub.settings.max_body)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path.startswith("/v1/"):
            await channel(scope, receive, send)
        elif path.startswith("/api/"):
            await api(scope, receive, send)
        else:
            await error(send, 404, f"no route {path}")

    return app


def _granian(settings: MasterSettings, paths: Paths, app: Any) -> Server:
    # Long-lived channels: pings keep NATs and middleboxes from silently dropping idle
    # connections, and the stream limit leaves room for the two channel streams plus API use.
    h2 = HTTP2Settings(
        keep_alive_interval=int(settings.heartbeat * 1000),
        keep_alive_timeout=int(settings.dead_after),
        max_concurrent_streams=256,
        initial_connection_window_size=4 * 1024 * 1024,
        initial_stream_window_size=1024 * 1024,
    )
    h1 = HTTP1Settings(header_read_timeout=30_000, keep_alive=True)
    return Server(
        app, address=settings.host, port=settings.port, interface=Interfaces.ASGINL,
        http=HTTPModes.auto if settings.http2 else HTTPModes.http1,
        http1_settings=h1, http2_settings=h2, backlog=4096,
        ssl_cert=paths.cert.resolve(), ssl_key=paths.key.resolve(),
        log_enabled=False, websockets=False,
    )


async def _bound_port(timeout: float = 10.0) -> int:
    me = psutil.Process(os.getpid())
    with anyio.fail_after(timeout):
        while True:
            for conn in me.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    return int(conn.laddr.port)
            await anyio.sleep(0.02)


def _urls(settings: MasterSettings, port: int) -> list[str]:
    if settings.advertise:
        return list(settings.advertise)
    host = settings.host if settings.host not in ("0.0.0.0", "::") else socket.gethostname()
    host = f"[{host}]" if ":" in host else host
    return [f"https://{host}:{port}"]


class StartupError(Exception):
    """The master cannot start; the message says why and what to do."""


def _check_port_free(host: str, port: int) -> None:
    # granian binds with SO_REUSEPORT, so a second master on a taken port would silently share
    # it with the first. A plain bind without that option tells the truth.
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror} (another master?)") from None


def _lock_data_dir(paths: Paths) -> Any:
    paths.root.mkdir(parents=True, exist_ok=True)
    fh = open(paths.root / "master.lock", "a+")  # held for the life of the process
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        raise StartupError(f"another master is running on {paths.root} (pid {fh.read().strip() or '?'})") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


async def serve(settings: MasterSettings) -> None:
    paths = Paths(settings.data_dir)
    lock = _lock_data_dir(paths)
    _check_port_free(settings.host, settings.port)
    extra = [u.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") for u in settings.advertise]
    ensure_pki(paths, server_names(settings.host, extra))
    store = Store(paths.db)
    admin_token, first_start = ensure_admin_token(store, paths)
    e2e_private = ensure_e2e_key(paths)
    hub = Hub(Db(store), settings)
    urls: list[str] = []
    server = _granian(settings, paths, build_app(hub, paths, urls, e2e_private))
    try:
        async with anyio.create_task_group() as tg:
            await hub.run(tg)
            tg.start_soon(server.serve)
            port = await _bound_port()
            urls.extend(_urls(settings, port))
            written = write_client_configs(paths, urls[0], admin_token, settings.write_user_config)
            _announce(urls, paths, written, first_start, settings.http2)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            print("zy master: shutting down", flush=True)
            hub.begin_shutdown()
            await anyio.sleep(0.1)  # let the channel handlers end their streams
            server.interrupt_signal = True
            server.main_loop_interrupt.set()
            with anyio.move_on_after(5):
                while server.wrks:  # noqa: ASYNC110 - granian exposes no event for this
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    finally:
        store.close()
        lock.close()


def _announce(urls: list[str], paths: Paths, written: list[Any], first: bool, http2: bool) -> None:
    out = sys.stdout
    print(f"zy master listening on {urls[0]} ({'h2 + http/1.1' if http2 else 'http/1.1 only'})", file=out)
    print(f"  data dir:      {paths.root.resolve()}", file=out)
    if first:
        print("  first start:   created the CA, a server certificate and an admin token", file=out)
    for path in written:
        print(f"  client config: {path}", file=out)
    print(f"  connect with:  export ZY_CONFIG={paths.client_config.resolve()}", file=out)
    print("  add agents:    zy token create   then   zy agent --join TOKEN --state-dir DIR", file=out)
    out.flush()
