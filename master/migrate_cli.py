"""`zy master migrate-store`: move a SQLite data dir's state into PostgreSQL (issue 15; filled in
by the migration work)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = actions.add_parser("migrate-store", help="copy a SQLite data dir's state into PostgreSQL",
                           description="Copy everything a master keeps in DATA_DIR/master.db into a PostgreSQL "
                           "store, losing nothing: agents keep their uuids and credentials.")
    p.add_argument("--from", dest="source", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--to", dest="target", required=True, metavar="URL")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    raise SystemExit("zy master migrate-store: not built yet")
