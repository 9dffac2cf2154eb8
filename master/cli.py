"""`zy master`: registered on the `hcsdk.commands` entry-point group."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from hcsdk.common.runtime import tune_gc
from hcsdk.net.serve import parse_listen
from hcsdk.net.settings import add_channel_options, channel_options

from .settings import MasterSettings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "master", help="run the master (agents connect to it; the SDK talks to it)",
        description="Run the master. On first start it creates DATA_DIR with a SQLite store, its own CA, "
        "a server certificate, an admin token and client.toml.",
    )
    p.add_argument("--data-dir", type=Path, default=Path("./state/master"),
                   help="state directory (default %(default)s)")
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8443), metavar="HOST:PORT",
                   help="address to listen on; port 0 picks a free one on the first start and the same one "
                   "after (DATA_DIR/listen.port: enrolled agents dial it) (default 127.0.0.1:8443)")
    p.add_argument("--advertise", action="append", default=[], metavar="URL",
                   help="URL agents should use (repeatable); default: from --listen, or this host's name "
                   "when listening on 0.0.0.0")
    p.add_argument("--no-user-config", action="store_true",
                   help="do not write client.toml into the user's config dir ($XDG_CONFIG_HOME/zy or ~/.config/zy)")
    add_channel_options(p, "master", MasterSettings)  # --no-http2, --heartbeat, --dead-after, --max-frame
    p.add_argument("--offline-grace", type=float, default=15.0,
                   help="seconds an agent may be gone before its open tasks end (default 15)")
    p.add_argument("--startup-grace", type=float, default=40.0,
                   help="after a restart, seconds agents with open tasks have to reconnect (default 40)")
    p.add_argument("--handshake-concurrency", type=int, default=32, metavar="N",
                   help="handshakes processed at once (default 32)")
    p.add_argument("--handshake-queue", type=int, default=512, metavar="N",
                   help="handshakes that may wait; beyond, agents get 503 and retry after a backoff, so a "
                   "reconnect storm cannot swamp the master (default 512)")
    p.add_argument("--sample-retention", type=float, default=30.0, metavar="DAYS",
                   help="keep scheduled samples this many days (default 30)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close an HTTP/1 connection whose request head is not in within this time (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="answer 408 to a request body (enrollment, handshake) not in within this time (default 30)")
    p.add_argument("--address-limit", type=int, default=256, metavar="N",
                   help="requests one source address may have in flight before they authenticate; beyond, 429 "
                   "(0: no cap; authenticated channels never count, so NATs and proxies are fine; default 256)")
    p.add_argument("--downloads-per-credential", type=int, default=8, metavar="N",
                   help="blob downloads (release chunks, builds) one agent may have in flight, a proxy 8 times "
                   "that; beyond, 429 (default 8)")
    p.add_argument("--downloads-total", type=int, default=256, metavar="N",
                   help="blob downloads in flight from all agents and proxies together; beyond, 429 (default 256)")
    p.add_argument("--send-timeout", type=float, default=60.0, metavar="S",
                   help="seconds one 256 KiB piece of a download may take to leave before the reader is dropped "
                   "(default 60)")
    p.add_argument("--ssh-proxy", action="append", default=[], metavar="USER@HOST[:PORT]",
                   help="reach a proxy's host over SSH and forward a port there back to this master "
                   "(for sites that accept only inbound SSH; repeatable)")
    p.add_argument("--ssh-key", type=Path, help="private key for --ssh-proxy")
    p.add_argument("--ssh-known-hosts", type=Path,
                   help="known_hosts file with the proxy hosts' keys (required: no trust on first use)")
    p.add_argument("--ssh-remote-port", type=int, default=8443,
                   help="port opened on the proxy's host (127.0.0.1) that leads to this master (default 8443)")
    p.add_argument("--store", metavar="URL", default=None,
                   help="keep all state in PostgreSQL (postgresql://user@host/db) instead of DATA_DIR/master.db; "
                   "masters started with the same --store and --key-file form one control plane")
    p.add_argument("--key-file", type=Path, default=None, metavar="F",
                   help="with --store: the key the shared secrets are encrypted under in the store (the first "
                   "master creates F, 0600; copy it to the others: with the store, it opens the whole control plane) "
                   "(default DATA_DIR/cluster.key)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_main)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=False,
                               title="actions (without one, the master runs)")
    from .cluster_cli import register as register_cluster
    from .migrate_cli import register as register_migrate

    register_cluster(actions)
    register_migrate(actions)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = args.listen
    settings = MasterSettings(
        data_dir=args.data_dir, host=host, port=port, advertise=args.advertise, **channel_options(args),
        offline_grace=args.offline_grace,
        startup_grace=args.startup_grace, handshake_concurrency=max(1, args.handshake_concurrency),
        handshake_queue=max(0, args.handshake_queue),
        write_user_config=not args.no_user_config,
        ssh_proxies=args.ssh_proxy, ssh_key=args.ssh_key, ssh_known_hosts=args.ssh_known_hosts,
        ssh_remote_port=args.ssh_remote_port, sample_retention_days=args.sample_retention,
        header_timeout=max(1.0, args.header_timeout), body_timeout=max(1.0, args.body_timeout),
        address_limit=max(0, args.address_limit), downloads_per_credential=max(1, args.downloads_per_credential),
        downloads_total=max(1, args.downloads_total), send_timeout=max(1.0, args.send_timeout),
        store_url=args.store, key_file=args.key_file,
    )
    if settings.key_file is not None and settings.store_url is None:
        print("zy master: --key-file goes with --store (on SQLite the secrets stay in DATA_DIR, unsealed, 0600)",
              file=sys.stderr)
        return 2
    if settings.ssh_proxies and not (settings.ssh_key and settings.ssh_known_hosts):
        print("zy master: --ssh-proxy needs --ssh-key and --ssh-known-hosts (the host key to expect)",
              file=sys.stderr)
        return 2
    from hcsdk.net.serve import StartupError

    from .server import serve

    tune_gc()
    try:
        anyio.run(serve, settings)
    except StartupError as exc:
        print(f"zy master: {exc}", file=sys.stderr)
        return 2
    return 0
