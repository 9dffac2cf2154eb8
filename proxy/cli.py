"""`zy proxy`: registered on the `hcsdk.commands` entry-point group."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hcsdk.common.jointoken import JOIN_ENV, pop_env_token, reexec_without_join, running_as
from hcsdk.common.runtime import tune_gc
from hcsdk.net.serve import parse_listen
from hcsdk.net.settings import add_channel_options, channel_options

if TYPE_CHECKING:  # proxy.cli is loaded by every `zy` command: the relay only when it runs
    from .relay import Relay


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "proxy", help="run a proxy: agents behind it reach the master through one shared channel",
        description="Run a proxy. It enrolls with the master once (a proxy token from `zy token create --kind proxy "
        "--proxy-name HOST`, in --join-file or ZY_JOIN_TOKEN), then relays for every agent (or "
        "proxy) that connects to it, over a single upstream channel to --upstream (the master or another proxy).",
    )
    p.add_argument("--upstream", action="append", default=[], metavar="URL",
                   help="master or next proxy (repeatable: tried in this order, the first preferred, e.g. a direct "
                   "uplink before an SSH tunnel); default: the URLs in the join token")
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8444), metavar="HOST:PORT",
                   help="address to serve agents on; port 0 picks a free one (default 127.0.0.1:8444)")
    p.add_argument("--data-dir", type=Path, default=Path("./state/proxy"),
                   help="identity, TLS certificate and the chunk cache (default %(default)s)")
    p.add_argument("--join-file", type=Path, metavar="PATH",
                   help="file holding the proxy join token (`zy token create --kind proxy`), for the first start")
    p.add_argument("--join", metavar="TOKEN",
                   help=f"join token on the command line (other users can read it there: prefer --join-file or "
                   f"{JOIN_ENV})")
    p.add_argument("--advertise", action="append", default=[], metavar="URL",
                   help="URL agents use to reach this proxy (its host goes into the certificate)")
    p.add_argument("--hostname", help="name to report instead of the system hostname")
    # --no-http2, --heartbeat, --dead-after, --h2-retry, --backoff-cap, --idle-connection-grace,
    # --connections-per-address
    add_channel_options(p, "proxy")  # ProxySettings keeps ChannelSettings's defaults
    p.add_argument("--cache-size", type=_size, default=10 * 1024**3, metavar="SIZE",
                   help="disk space for the chunk cache under DATA_DIR/cache, in bytes or with K/M/G/T "
                   "(binary units); 0 keeps nothing (default 10G)")
    p.add_argument("--stats-every", type=float, default=10.0, metavar="SECONDS",
                   help="report the cache counters to the master this often when they changed (default 10; "
                   "0: never)")
    p.add_argument("--seed-copies", type=_positive, default=1, metavar="N",
                   help="P2P: agents this proxy hands each chunk of a release to; the others take it from "
                   "them (default 1: the proxy sends a release about once)")
    p.add_argument("--upstream-parallel", type=_positive, default=2, metavar="N",
                   help="P2P: chunks not yet cached that agents fetch through this proxy at once, so they "
                   "cross a thin upstream link in order (default 2)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=main)


def main(args: argparse.Namespace, relay_class: type[Relay] | None = None) -> int:
    """Runs `zy proxy` with the parsed ``args``; ``relay_class`` as in proxy.server.serve."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    join_env = pop_env_token()  # first: nothing this process starts inherits it
    from .relay import Relay
    from .server import RESTART, ProxySettings, run

    host, port = args.listen
    tune_gc()
    code = run(ProxySettings(
        restart=running_as("proxy"),
        data_dir=args.data_dir, host=host, port=port, upstreams=args.upstream, join=args.join,
        join_file=args.join_file, join_env=join_env,
        advertise=args.advertise, hostname=args.hostname, **channel_options(args),
        cache_size=args.cache_size, stats_every=args.stats_every, seed_copies=args.seed_copies,
        upstream_parallel=args.upstream_parallel,
    ), relay_class or Relay)
    if code == RESTART:
        reexec_without_join()
    return code


def _size(text: str) -> int:
    from hcsdk.common.sizes import parse_size  # binary units, as --cache-size always meant

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"wants a whole number of at least 1, got {text!r}")
    return int(text)
