"""Runs a proxy: enrolls once, keeps one upstream channel, serves clients with granian."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from hcsdk.common import facts as facts
from hcsdk.common.identity import StateDir
from hcsdk.common.jointoken import JOIN_ENV, JoinToken, read_join
from hcsdk.net.channel import Channel
from hcsdk.net.enroll import enroll
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
from hcsdk.net.settings import ChannelSettings
from hcsdk.net.tls import make_csr, norm_name

from .app import ProxyApp
from .cache import ChunkCache
from .relay import Relay
from .tracker import Tracker

log = logging.getLogger("zy.proxy")


@dataclass(kw_only=True)
class ProxySettings(ChannelSettings):
    """The channel's settings (both ways: ``http2`` is what agents are served, the upstream is
    always tried over HTTP/2 first) and the proxy's own."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8444
    upstreams: list[str] = field(default_factory=list)
    join: str | None = None
    join_file: Path | None = None
    #: the token from ZY_JOIN_TOKEN (already removed from the environment)
    join_env: str | None = None
    #: this process is the `zy proxy` command line: once enrolled it replaces itself without the token
    restart: bool = False
    advertise: list[str] = field(default_factory=list)
    hostname: str | None = None
    #: bytes of chunks kept under data_dir/cache (0: keep none)
    cache_size: int = 10 * 1024**3
    #: seconds between reports of the cache counters to the master (when they changed)
    stats_every: float = 10.0
    #: P2P: agents the proxy gives each chunk to itself; the others take it from them
    seed_copies: int = 1
    #: P2P: chunks not cached here that agents are sent to fetch through the proxy at once
    upstream_parallel: int = 2
    #: requests one source address may have in flight before they are authenticated (429 beyond)
    max_unauthenticated: int = 64


def _cert_names(token: JoinToken, host: str, advertised: list[str]) -> list[str]:
    """The names to ask the master to sign: exactly those the admin put in the proxy token (the
    master signs nothing else). The hosts this proxy listens on or advertises must be among them,
    or agents could not verify it: said now, not as a TLS failure on every agent later."""
    if not token.proxy_names:
        return server_names(host, advertised)  # a token from an older master: let it decide
    allowed = {norm_name(n) for n in token.proxy_names}
    wanted = [n for n in [host, *advertised] if n and n not in ("0.0.0.0", "::")]
    # a loopback listener (behind a local forwarder) is reached by the advertised names
    missing = [n for n in wanted if norm_name(n) not in allowed and not (n == host and _loopback(n))]
    if missing:
        raise StartupError(f"this proxy serves {', '.join(missing)}, which its join token does not name "
                           f"(it allows {', '.join(token.proxy_names)}): create a token with --proxy-name for each")
    return list(token.proxy_names)


def _loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name == "localhost"


async def _enroll_once(settings: ProxySettings, state: StateDir) -> Any:
    ident = state.load()
    if ident.enrolled:
        return ident
    text = read_join("zy proxy", settings.join, settings.join_file, settings.join_env)
    if not text:
        raise StartupError(f"{settings.data_dir} holds no enrollment; start once with --join-file PATH "
                           f"(or {JOIN_ENV}=TOKEN), a token from `zy token create --kind proxy`")
    token = JoinToken.decode(text)
    if token.kind != "proxy" and token.proxy_ca_fingerprint:  # (an older master's tokens have no kind)
        raise StartupError("this join token enrolls agents; a proxy needs one from "
                           "`zy token create --kind proxy --proxy-name HOST`")
    extra = [u.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") for u in settings.advertise]
    csr, key = make_csr(_cert_names(token, settings.host, extra))
    (state.root / "tls.key").write_bytes(key)
    os.chmod(state.root / "tls.key", 0o600)
    ident = await enroll(state, ident, token, facts.collect(settings.hostname), {}, kind="proxy",
                         urls=settings.upstreams or None, csr=csr,
                         on_warning=lambda w: print(f"zy proxy: warning from the master: {w}", file=sys.stderr))
    print(f"zy proxy: enrolled as {ident.uuid}", flush=True)
    return ident


#: what ``run`` returns when the proxy should start over without its join token
RESTART = -1


async def serve(settings: ProxySettings, relay_class: type[Relay] = Relay) -> bool:
    """Runs the proxy until SIGINT/SIGTERM. True: enrolled, now restart without the join token
    (it must not stay in this process's command line or environment). ``relay_class``: a
    :class:`Relay` subclass to relay with (tests/tampering_proxy.py's compromised relay)."""
    lock = lock_dir(settings.data_dir, "proxy")
    check_port_free(settings.host, settings.port)
    state = StateDir(settings.data_dir)
    ident = await _enroll_once(settings, state)
    if settings.restart and (settings.join or settings.join_env):
        lock.close()
        print("zy proxy: restarting without the join token", flush=True)
        return True
    upstreams = settings.upstreams or ident.urls
    # upstream: HTTP/2 whatever agents are served with, and the first URL preferred (see spread)
    channel_settings = settings.channel(http2=True, spread=False)

    def channel_for(relay: Relay) -> Channel:
        return Channel(ident.uuid, ident.credential, upstreams, state.ca_path.read_bytes(),
                       facts=lambda: facts.collect(settings.hostname), labels={},
                       outbox=relay.queue.pending_after, on_message=relay.from_upstream,
                       wake=relay.queue.current_wake, settings=channel_settings, on_lost=relay.upstream_lost)

    relay = relay_class(ident.uuid, channel_for)
    relay.tracker = Tracker(settings.seed_copies, settings.upstream_parallel)
    cache = ChunkCache(settings.data_dir / "cache", settings.cache_size)
    app = ProxyApp(relay, state.ca_path, settings, cache=cache)
    gated = AddressGate(app, settings.max_unauthenticated)
    # connections nobody authenticated on (issue 13 hole 5), as on the master: see hcsdk.net.reaper
    reaper = ConnectionReaper(settings.idle_connection_grace, settings.connections_per_address)
    server = granian_server(reaper.wrap(gated), settings.host, settings.port, state.root / "tls.pem",
                            state.root / "tls.key", http2=settings.http2, heartbeat=settings.heartbeat,
                            dead_after=settings.dead_after)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            port = await bound_port()
            tg.start_soon(reaper.run, port)
            host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
            print(f"zy proxy listening on https://{host}:{port} (upstream: {', '.join(upstreams)})", flush=True)
            tg.start_soon(relay.channel.run_forever)
            if settings.stats_every > 0:
                tg.start_soon(app.report_stats, bytes.fromhex(ident.e2e_key), settings.stats_every)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            print("zy proxy: shutting down", flush=True)
            relay.upstream_lost()
            await stop_server(server)
            tg.cancel_scope.cancel()
    finally:
        lock.close()
    return False


def run(settings: ProxySettings, relay_class: type[Relay] = Relay) -> int:
    try:
        if anyio.run(serve, settings, relay_class):
            return RESTART
    except StartupError as exc:
        print(f"zy proxy: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # enrollment trouble and the like: one line, not a traceback
        from hcsdk.common.errors import JoinTokenError
        from hcsdk.net.enroll import EnrollError

        if isinstance(exc, (EnrollError, JoinTokenError)):
            print(f"zy proxy: {exc}", file=sys.stderr)
            return 2
        raise
    return 0
