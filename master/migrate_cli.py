"""`zy master migrate-store --from DATA_DIR --to URL`: move a SQLite data dir's state into PostgreSQL.

The copy itself (one PostgreSQL transaction, all or nothing) is master/store/copy.py; this is the
command around it: it checks the data dir, holds the data dir's master lock for the whole copy
(so no master writes to the file meanwhile, and none starts on it), prints progress and counts on
stderr, then what the operator does next. Exit status 2, with the reason, when nothing was copied.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

# what the copy needs (psycopg, the CA's cryptography, granian's serve module) is imported where it
# runs: `zy master` registers this action in every `zy` command's parser, `zy agent`'s included


def register(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = actions.add_parser("migrate-store", help="copy a SQLite data dir's state into PostgreSQL",
                           description="Copy everything a master keeps in DATA_DIR/master.db (and DATA_DIR/blobs "
                           "when the store keeps blob bytes) into an empty PostgreSQL store, in one transaction, "
                           "losing nothing: agents keep their uuids and credentials, runs their events and ids. "
                           "Stop the master on DATA_DIR first.")
    p.add_argument("--from", dest="source", type=Path, required=True, metavar="DATA_DIR",
                   help="the master's data dir (holds master.db)")
    p.add_argument("--to", dest="target", required=True, metavar="URL",
                   help="the PostgreSQL store, postgresql://user@host/db (an empty database)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from .store.copy import CopyError
    from .store.errors import SchemaError

    try:
        migrate(args.source, args.target, sys.stderr)
    except (CopyError, SchemaError) as exc:
        print(f"zy master migrate-store: {exc}", file=sys.stderr)
        return 2
    return 0


def migrate(source: Path, url: str, out: TextIO) -> dict[str, int]:
    """Copy ``source`` (a master's data dir) into the store at ``url``, reporting on ``out``."""
    from .bootstrap import Paths
    from .store.copy import CopyError, copy_store, describe_url

    if not url.startswith(("postgresql://", "postgres://")):
        raise CopyError(f"--to {describe_url(url)!r}: expected a postgresql://user@host/db URL")
    paths = Paths(source)
    if not source.is_dir() or not paths.db.is_file():
        raise CopyError(f"--from {source}: not a master's data dir (no {paths.db.name} in it)")
    lock = _lock(source)
    try:
        print(f"zy master migrate-store: {paths.db} -> {describe_url(url)}", file=out, flush=True)
        started = time.monotonic()
        counts = copy_store(paths.db, url, _Progress(out))
        _summary(counts, time.monotonic() - started, source, url, out)
    finally:
        lock.close()
    return counts


def _lock(source: Path) -> Any:
    """The data dir's master lock (hcsdk.net.serve.lock_dir, what `zy master` holds while it runs)."""
    from hcsdk.net.serve import StartupError, lock_dir

    from .store.copy import CopyError

    try:
        return lock_dir(source, "master")
    except StartupError as exc:
        raise CopyError(f"{exc}: stop that master first (a copy of a store still being written loses what "
                        "comes after it)") from None


class _Progress:
    """Per-table progress on stderr: a line every BATCH rows of a big table, and its count."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, table: str, done: int, total: int) -> None:
        from .store.copy import BATCH

        if done == total:
            print(f"  {table:<16} {done:>10} rows" if table != "blobs" else f"  {'blobs':<16} {done:>10} files",
                  file=self.out, flush=True)
        elif done and total > BATCH:
            print(f"  {table:<16} {done:>10} / {total}", file=self.out, flush=True)


def _summary(counts: dict[str, int], seconds: float, source: Path, url: str, out: TextIO) -> None:
    from .bootstrap import Paths
    from .store.copy import BLOBS_KEY, describe_url

    rows = sum(n for t, n in counts.items() if t != BLOBS_KEY)
    print(f"copied {rows} rows of {len(counts) - (BLOBS_KEY in counts)} tables in {seconds:.1f} s "
          f"({rows / max(seconds, 1e-6):.0f} rows/s), in one transaction", file=out)
    blobs = source / "blobs"
    if BLOBS_KEY in counts:
        print(f"copied {counts[BLOBS_KEY]} blob files into the store", file=out)
    elif blobs.is_dir() and any(blobs.iterdir()):
        print(f"this store keeps no blob bytes: the blob files stay in {blobs}; copy that folder to every "
              "master's data dir", file=out)
    if not (Paths(source).ca_cert.is_file() and Paths(source).ca_key.is_file()):
        print(f"warning: {source} holds no CA (ca.pem, ca.key): the first master on the store will make a new one, "
              "which the enrolled agents do not trust; copy the old master's CA files into it first", file=out)
    print("not copied: sessions, the masters registry and leases (true only of the masters running now)", file=out)
    print(f"next: start the first master on the store with THIS data dir,\n"
          f"    zy master --data-dir {source} --store {describe_url(url)} ...\n"
          f"  it takes {source}'s CA and proxy CA, end-to-end key and admin token into the store, sealed under\n"
          f"  {source}/cluster.key, so enrolled agents and proxies, and client.toml, keep working unchanged.\n"
          f"  Then copy cluster.key (0600) to the other masters and start them with --store and --key-file.\n"
          f"  Keep {source} (and a backup of it) until then: its CA key is not in the store before that start.",
          file=out)
