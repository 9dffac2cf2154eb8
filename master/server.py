"""Runs the master: granian (embedded, in this process's event loop) serving the ASGI app,
next to the hub's background work. One process holds the agent sessions, so one worker."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from hcsdk.net.asgi import error
from hcsdk.net.limits import AddressGate
from hcsdk.net.reaper import ConnectionReaper
from hcsdk.net.serve import (
    StartupError,
    bound_port,
    check_port_free,
    granian_server,
    lock_dir,
    server_names,
    stop_server,
)
from hcsdk.protocol.tasks import SessionKind

from .api import BodyLimit, build_api, cluster_urls
from .blobs import BlobStore
from .bootstrap import (
    Paths,
    ensure_admin_token,
    ensure_e2e_key,
    ensure_master_id,
    ensure_pki,
    ensure_shared_pki,
    write_client_configs,
)
from .channel import ChannelApp
from .hub import Hub
from .keyring import AgentKeys
from .settings import MasterSettings
from .ssh_downlink import SshTarget, keep_tunnel
from .store import Store, StoreThread, open_store

log = logging.getLogger("zy.master")


def build_app(hub: Hub, paths: Paths, urls: list[str], e2e_private: bytes,
              reaper: ConnectionReaper | None = None, agent_keys: AgentKeys | None = None) -> Any:
    blobs = BlobStore(paths.root / "blobs", hub)
    channel = ChannelApp(hub, paths, e2e_private, blobs, agent_keys)
    api = BodyLimit(build_api(hub, paths, urls, e2e_private), hub.settings.max_body)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path.startswith("/v1/"):
            await channel(scope, receive, send)
        elif path == "/api/v1/blobs" and scope["method"] == "POST":
            await blobs.upload(scope, receive, send)  # streamed: past the API's body limit
        elif path.startswith("/api/"):
            if await blobs.admin(scope, send):  # the token, from the headers, before any body is read
                await api(scope, receive, send)
        else:
            await error(send, 404, f"no route {path}")

    # requests not yet authenticated, per source address (issue 13): see hcsdk.net.limits
    gated = AddressGate(app, hub.settings.address_limit)
    # connections nobody authenticated on (issue 13 hole 5): see hcsdk.net.reaper
    return reaper.wrap(gated) if reaper is not None else gated


#: the port this data dir's master last listened on: agents enrolled here dial it
PORT_FILE = "listen.port"


def _reuse_port(paths: Paths, port: int) -> int:
    """``--listen HOST:0`` on a data dir that has served before takes the port it had: every
    agent enrolled here has that port in its URLs, and a new one would strand them all."""
    if port != 0:
        return port
    try:
        old = int((paths.root / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return 0  # a first start: any free port
    if not 0 < old < 65536:
        return 0
    log.info("reusing port %d from %s", old, paths.root / PORT_FILE)
    return old


def _urls(settings: MasterSettings, port: int) -> list[str]:
    if settings.advertise:
        return list(settings.advertise)
    host = settings.host if settings.host not in ("0.0.0.0", "::") else socket.gethostname()
    host = f"[{host}]" if ":" in host else host
    return [f"https://{host}:{port}"]


async def serve(settings: MasterSettings) -> None:
    paths = Paths(settings.data_dir)
    lock = lock_dir(paths.root, "master")
    asked = settings.port
    settings.port = _reuse_port(paths, asked)
    try:
        check_port_free(settings.host, settings.port)
    except StartupError as exc:
        if asked == settings.port:
            raise
        raise StartupError(f"{exc}. This data dir's master listened on port {settings.port} before and its agents "
                           f"dial that port: free it, or move with --listen {settings.host}:NEWPORT (then agents "
                           "need --master with the new URL, or a new enrollment)") from None
    settings.master_id = settings.master_id or ensure_master_id(paths)
    store, start = _open_state(settings, paths)
    e2e_private = ensure_e2e_key(paths)
    hub = Hub(StoreThread(store), settings)
    urls = hub.urls  # filled once the server listens (the cluster registers them)
    reaper = ConnectionReaper(settings.idle_connection_grace, settings.connections_per_address)
    app = build_app(hub, paths, urls, e2e_private, reaper, start.agent_keys)
    server = granian_server(app, settings.host, settings.port, paths.cert, paths.key, http2=settings.http2,
                            heartbeat=settings.heartbeat, dead_after=settings.dead_after,
                            header_timeout=settings.header_timeout)
    try:
        async with anyio.create_task_group() as tg:
            await hub.run(tg)
            tg.start_soon(server.serve)
            port = await bound_port()
            tg.start_soon(reaper.run, port)
            (paths.root / PORT_FILE).write_text(f"{port}\n")
            urls.extend(_urls(settings, port))
            written = write_client_configs(paths, urls[0], start.admin_token, settings.write_user_config,
                                           urls=await cluster_urls(hub, urls))  # every live master's
            for spec in settings.ssh_proxies:
                target = SshTarget.parse(spec, settings.ssh_remote_port)
                assert settings.ssh_key is not None and settings.ssh_known_hosts is not None
                tg.start_soon(keep_tunnel, target, settings.ssh_key, settings.ssh_known_hosts,
                              "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host, port)
            _announce(urls, paths, written, start, settings)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            print("zy master: shutting down", flush=True)
            hub.begin_shutdown()
            await hub.leave()  # out of the cluster now: another master takes over at once
            await anyio.sleep(0.1)  # let the channel handlers end their streams
            await stop_server(server)
            tg.cancel_scope.cancel()
    finally:
        store.close()
        lock.close()


def _warn_legacy_proxies(store: Store) -> None:
    """Proxies enrolled before the proxy CA existed hold certificates from the master CA, which
    the SDK trusts: say so once, when the proxy CA is made, so they get re-enrolled."""
    legacy = [a for a in store.agents() if a.get("kind") == SessionKind.PROXY]
    if legacy:
        log.warning("%d proxies were enrolled before the proxy CA existed; their certificates come from the "
                    "master CA: re-enroll them (new data dir, `zy token create --kind proxy`) and revoke the old "
                    "ones", len(legacy))
        print(f"zy master: warning: {len(legacy)} proxies hold certificates from the master CA (enrolled before "
              "the proxy CA existed): re-enroll them with a proxy token and revoke the old ones", file=sys.stderr)


@dataclass
class _Start:
    """What the start found or made, for client.toml and the banner."""

    admin_token: str
    #: this master made the CA (a new data dir, or the first master of a new store)
    made_ca: bool
    #: with --store: the key file, and whether this master made it
    key_file: Path | None = None
    made_key_file: bool = False
    #: agents' MAC keys in the store: sealed under the cluster key with --store, as they were without
    agent_keys: AgentKeys = field(default_factory=lambda: AgentKeys(None))


def _open_state(settings: MasterSettings, paths: Paths) -> tuple[Store, _Start]:
    """The store, and the PKI and admin token: in the data dir alone (SQLite), or shared
    through the store, sealed under the key file, with every other master (--store)."""
    extra = [u.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") for u in settings.advertise]
    names = server_names(settings.host, extra)
    if settings.store_url is None:
        made_proxy_ca = ensure_pki(paths, names)
        store = open_store(paths.root, None)
        if made_proxy_ca:
            _warn_legacy_proxies(store)
        token, first = ensure_admin_token(store, paths)
        return store, _Start(token, first)
    key_file = settings.key_file or paths.cluster_key
    store = open_store(paths.root, settings.store_url)
    try:
        pki = ensure_shared_pki(store, paths, key_file, names)
    except BaseException:
        store.close()
        raise
    if pki.made_proxy_ca and not pki.made_ca:
        _warn_legacy_proxies(store)
    return store, _Start(pki.admin_token, pki.made_ca, key_file.resolve(), pki.made_key_file,
                         AgentKeys(pki.cluster_key))


def _announce(urls: list[str], paths: Paths, written: list[Any], start: _Start, settings: MasterSettings) -> None:
    out = sys.stdout
    print(f"zy master listening on {urls[0]} ({'h2 + http/1.1' if settings.http2 else 'http/1.1 only'})", file=out)
    print(f"  data dir:      {paths.root.resolve()}", file=out)
    if start.key_file is not None:
        print(f"  master id:     {settings.master_id} (shared store: {_redacted(settings.store_url or '')})", file=out)
        made = " (made now)" if start.made_key_file else ""
        print(f"  key file:      {start.key_file}{made}: copy this file (mode 600) to every other master of "
              "this store and give it with --key-file", file=out)
    if start.made_ca:
        where = "into the shared store" if start.key_file is not None else ""
        print(f"  first start:   created the CA, a server certificate and an admin token {where}".rstrip(), file=out)
    elif start.key_file is not None:
        print("  joined:        the CA and the admin token come from the shared store; "
              "this master's server certificate is its own", file=out)
    for path in written:
        print(f"  client config: {path}", file=out)
    print(f"  connect with:  export ZY_CONFIG={paths.client_config.resolve()}", file=out)
    print("  add agents:    zy token create > TOKEN   then   zy agent --join-file TOKEN --state-dir DIR", file=out)
    out.flush()


def _redacted(url: str) -> str:
    """The store URL without a password (the banner goes to logs)."""
    from .store.postgres import redact  # (master.store.postgres loads psycopg: only with a --store URL)

    return redact(url) if url else url
