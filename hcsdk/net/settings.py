"""The channel's settings, declared once for both ends, and the one function that puts them on a
command line (``zy master``, ``zy proxy``, ``zy agent``, ``zy swarm``).

Each side uses the part it needs: a dialing side (agent, swarm, a proxy upstream) heartbeats,
notices silence, retries HTTP/2 and backs off; a serving side (master, a proxy downstream) also
tells its clients the idle beat, how long a poll is held and the largest frame. ``MasterSettings``
and ``ProxySettings`` extend :class:`ChannelSettings`, so the fields and their defaults exist once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Literal

from hcsdk.protocol.tasks import ChannelMode
from hcsdk.protocol.wire import DEFAULT_MAX_FRAME

__all__ = ["ENROLL_BODY", "HANDSHAKE_BODY", "ChannelSettings", "Role", "add_channel_options", "channel_options"]

#: the largest bodies a serving side (master or proxy) reads before anybody has proved who sends
#: them: an enrollment (a join token, facts, labels, a key and a CSR take a few KiB) and a
#: handshake. One value for both sides, so a handshake the master takes directly is never refused
#: by a proxy on the way.
ENROLL_BODY = 64 * 1024
HANDSHAKE_BODY = 1024 * 1024


@dataclass(kw_only=True)
class ChannelSettings:
    #: dialing: try HTTP/2 (else poll over HTTP/1.1); serving: offer it
    http2: bool = True
    #: most seconds between heartbeats each way on an idle channel
    heartbeat: float = 5.0
    #: a channel silent this long is dead (the dialing side reconnects)
    dead_after: float = 12.0
    #: dialing, while polling: retry HTTP/2 this often
    h2_retry: float = 60.0
    #: dialing: reconnects back off from ``backoff_base`` to at most ``backoff_cap`` seconds (full jitter)
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    #: dialing: start at a random URL (agents spread over proxies) or at the first (a proxy prefers
    #: its direct uplink and keeps an SSH tunnel as the fallback)
    spread: bool = True
    #: dialing: bind outgoing connections to this source address (a swarm spreads over 127.0.0.0/8)
    local_address: str | None = None
    #: serving: seconds between application heartbeats on a quiet HTTP/2 channel: HTTP/2 PINGs,
    #: answered below Python, keep it alive, so 10,000 idle agents cost the server almost nothing
    idle_beat: float = 60.0
    #: serving: how long a poll request waits for something to deliver
    poll_wait: float = 2.0
    #: the largest channel message in bytes
    max_frame: int = DEFAULT_MAX_FRAME
    #: serving: seconds an accepted connection may go without an authenticated request before it
    #: is closed (a TLS connection that then sends nothing; header + body timeout + 5), and how
    #: many such connections one address may hold (the oldest beyond are closed; 0 = no cap):
    #: see hcsdk.net.reaper
    idle_connection_grace: float = 45.0
    connections_per_address: int = 256

    def downlink_beat(self, mode: str) -> float:
        """Seconds between heartbeats on a served downlink: HTTP/2 has PINGs below Python, a
        polling client only has our heartbeats to tell the channel is alive."""
        return self.idle_beat if mode == ChannelMode.H2 else self.heartbeat

    def served(self) -> dict[str, Any]:
        """What a serving side's handshake answer says of the channel it serves (the master adds
        its ``dead_after``; a proxy passes on the master's)."""
        return {"heartbeat": self.heartbeat, "idle_beat": self.idle_beat, "poll_wait": self.poll_wait,
                "max_frame": self.max_frame}

    def channel(self, **changes: Any) -> ChannelSettings:
        """Just the channel's part of these settings (a subclass's own fields left behind), with
        ``changes``: what a proxy dials its upstream with."""
        mine = {f.name: getattr(self, f.name) for f in fields(ChannelSettings)}
        return ChannelSettings(**{**mine, **changes})


#: who puts the channel options on its command line
Role = Literal["master", "proxy", "agent", "swarm"]

_CHANNEL_FIELDS = {f.name for f in fields(ChannelSettings)}

#: the flags each role has
_FLAGS: dict[str, tuple[str, ...]] = {
    "master": ("no_http2", "heartbeat", "dead_after", "max_frame", "reaper"),
    "proxy": ("no_http2", "heartbeat", "dead_after", "h2_retry", "backoff_cap", "reaper"),
    "agent": ("no_http2", "heartbeat", "dead_after", "h2_retry", "backoff_cap"),
    "swarm": ("no_http2", "heartbeat", "dead_after"),
}

#: help texts: one per flag, with the words that differ by role (the defaults are argparse's
#: %(default)g, from the settings class, so the help cannot drift from them)
_NO_HTTP2 = {
    "master": "refuse HTTP/2 (agents fall back to HTTP/1.1 polling)",
    "proxy": "serve agents over HTTP/1.1 only (they poll)",
    "agent": "never try HTTP/2; poll over HTTP/1.1",
    "swarm": "poll over HTTP/1.1",
}
_HEARTBEAT = {
    "master": "seconds between heartbeats on an idle channel; agents beat at least twice as often "
              "(default %(default)g)",
    "proxy": "seconds between heartbeats (default %(default)g)",
    "agent": "most seconds between heartbeats; the master may ask for more often (default %(default)g)",
    "swarm": "most seconds between heartbeats (default %(default)g)",
}
_DEAD_AFTER = {
    "master": "drop an agent's channel after this many silent seconds (default %(default)g)",
    "proxy": "a silent channel is dead after this many seconds (default %(default)g)",
    "agent": "reconnect (or fail over to another proxy) after this many silent seconds (default %(default)g)",
    "swarm": "reconnect after this many silent seconds (default %(default)g)",
}
_H2_RETRY = {
    "proxy": "while polling upstream over HTTP/1.1, retry HTTP/2 this often (default %(default)g)",
    "agent": "while polling over HTTP/1.1, retry HTTP/2 this often, in seconds (default %(default)g)",
}
_BACKOFF_CAP = {
    "proxy": "longest wait between reconnects upstream (default %(default)g)",
    "agent": "longest wait between reconnect attempts, in seconds (default %(default)g)",
}


def add_channel_options(parser: argparse.ArgumentParser, role: Role,
                        settings: type[ChannelSettings] = ChannelSettings) -> None:
    """Add the channel flags ``role``'s command has (``--no-http2``, ``--heartbeat``,
    ``--dead-after``, ``--h2-retry``/``--backoff-cap`` where it dials, ``--max-frame`` on the
    master, ``--idle-connection-grace``/``--connections-per-address`` where it serves), with
    the defaults of the ``settings`` class it fills (MasterSettings has its own ``dead_after``);
    read them back with :func:`channel_options`."""
    have = _FLAGS[role]
    own: dict[str, Any] = {f.name: f.default for f in fields(settings) if f.name in _CHANNEL_FIELDS}
    d = ChannelSettings(**own)
    parser.add_argument("--no-http2", action="store_true", help=_NO_HTTP2[role])
    parser.add_argument("--heartbeat", type=float, default=d.heartbeat, help=_HEARTBEAT[role])
    parser.add_argument("--dead-after", type=float, default=d.dead_after, help=_DEAD_AFTER[role])
    if "h2_retry" in have:
        parser.add_argument("--h2-retry", type=float, default=d.h2_retry, help=_H2_RETRY[role])
    if "backoff_cap" in have:
        parser.add_argument("--backoff-cap", type=float, default=d.backoff_cap, help=_BACKOFF_CAP[role])
    if "max_frame" in have:
        parser.add_argument("--max-frame", type=int, default=d.max_frame,
                            help="largest channel message in bytes (default %(default)s)")
    if "reaper" in have:
        parser.add_argument("--idle-connection-grace", type=float, default=d.idle_connection_grace,
                            metavar="SECONDS",
                            help="close a connection on which no request authenticated within this time, e.g. one "
                            "that completed TLS and sent nothing (0: never; default %(default)g)")
        parser.add_argument("--connections-per-address", type=int, default=d.connections_per_address, metavar="N",
                            help="connections one source address may hold before any request on them "
                            "authenticated; the oldest beyond are closed (0: no cap; default %(default)s)")


def channel_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ChannelSettings fields the flags of :func:`add_channel_options` set, by name (pass
    them to ChannelSettings, MasterSettings or ProxySettings)."""
    out: dict[str, Any] = {"http2": not args.no_http2}
    for name in ("heartbeat", "dead_after", "h2_retry", "backoff_cap", "max_frame"):
        if hasattr(args, name):
            out[name] = getattr(args, name)
    if hasattr(args, "idle_connection_grace"):
        out["idle_connection_grace"] = max(0.0, args.idle_connection_grace)
        out["connections_per_address"] = max(0, args.connections_per_address)
    return out
