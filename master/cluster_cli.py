"""`zy master cluster`: the masters sharing a store (issue 15).

It reads the store's registry directly (``open_store``), so it works with every master down:
each master's id, URLs, the agents it held at its last heartbeat, how long ago that was, whether
it counts as alive (a heartbeat within ``master_dead_after``), and which one holds the lease
``singleton`` (runs the cluster's one-at-a-time work). Without ``--store``: the data dir's SQLite
store, which one master uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .settings import MasterSettings
from .store import SchemaError, Store, open_store
from .store.protocol import MasterRecord


def register(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = actions.add_parser("cluster", help="show the masters that share this store",
                           description="Show the masters sharing --store: id, URL, agents held, last heartbeat, "
                           "and which one runs the singleton jobs. Reads the store directly: no master needs to "
                           "be up. Without --store, the SQLite store in --data-dir (one master).")
    # (own dests: the parent `zy master` parser has --store and --data-dir too, given before the action)
    p.add_argument("--store", dest="cluster_store", metavar="URL", default=None,
                   help="the shared store, postgresql://user@host/db")
    p.add_argument("--data-dir", dest="cluster_data_dir", type=Path, default=None,
                   help="without --store: the master's data dir (default ./state/master)")
    p.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    url = args.cluster_store or getattr(args, "store", None)
    data_dir = args.cluster_data_dir or getattr(args, "data_dir", None) or Path("./state/master")
    if url is None and not (Path(data_dir) / "master.db").is_file():
        print(f"zy master cluster: no store: {data_dir} holds no master.db; give --store URL or --data-dir DIR",
              file=sys.stderr)
        return 2
    try:
        store = open_store(Path(data_dir), url)
    except (SchemaError, OSError) as exc:
        print(f"zy master cluster: cannot open the store: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # psycopg's errors (refused, auth) without importing psycopg here
        print(f"zy master cluster: cannot open the store {_where(url, data_dir)}: {exc}", file=sys.stderr)
        return 2
    try:
        rows = describe(store)
    finally:
        store.close()
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


def _where(url: str | None, data_dir: Path) -> str:
    if url is None:
        return str(data_dir)
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def describe(store: Store, dead_after: float | None = None) -> list[dict[str, Any]]:
    """The registry as rows for the table (and --json)."""
    limit = MasterSettings.master_dead_after if dead_after is None else dead_after
    return [_row(m, limit) for m in store.masters()]


def _row(m: MasterRecord, dead_after: float) -> dict[str, Any]:
    # ages by the store's clock (PostgreSQL's on a shared store), not this host's
    ago = max(0.0, m["heartbeat_age"])
    up = max(0.0, m["heartbeat_at"] + ago - m["started_at"])
    return {"id": m["id"], "urls": list(m["urls"]), "agents": m["agents"], "heartbeat_ago_s": round(ago, 1),
            "alive": ago < dead_after, "singleton": bool(m["singleton"]), "up_s": round(up, 1)}


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no master is registered in this store"
    head = ["", "ID", "URLS", "AGENTS", "HEARTBEAT", "STATE"]
    body = [["*" if r["singleton"] else "", r["id"], ",".join(r["urls"]) or "-", str(r["agents"]),
             f"{r['heartbeat_ago_s']:.1f}s ago", "alive" if r["alive"] else "dead"] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [head, *body]]
    return "\n".join([*lines, "* runs the cluster's singleton jobs (lease 'singleton')"])
