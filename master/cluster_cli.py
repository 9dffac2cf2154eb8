"""`zy master cluster`: the masters sharing a store (issue 15; filled in by the cluster work)."""

from __future__ import annotations

import argparse


def register(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = actions.add_parser("cluster", help="show the masters that share this store",
                           description="Show the masters sharing --store: id, URL, agents held, last heartbeat, "
                           "and which one runs the singleton jobs.")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    raise SystemExit("zy master cluster: not built yet")
