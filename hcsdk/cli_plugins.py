"""`zy plugins install|list|remove`: plugins on agents from the shell, hot-loaded. Prints one
row per agent (per plugin for list) and exits 1 when a target failed."""

from __future__ import annotations

import argparse

from hcsdk.cli_output import TARGETS_HELP, Subcommands, add_output, client, failed, show, targets


def register(sub: Subcommands) -> None:
    p = sub.add_parser("plugins", help="install, list and remove plugins on agents (hot-loaded, no restart)")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = psub.add_parser("install", help="install or replace a plugin (.py file, package dir or module name)")
    i.add_argument("path")
    r = psub.add_parser("remove", help="remove an installed plugin")
    r.add_argument("name")
    ls = psub.add_parser("list", help="every plugin on every target, with versions")
    for q in (i, r, ls):
        q.add_argument("-t", "--targets", required=True, help=TARGETS_HELP)
        add_output(q)
        q.set_defaults(func=_cmd_plugins)


def _cmd_plugins(args: argparse.Namespace) -> int:
    plugins = client().plugins
    where = targets(args.targets)
    if args.action == "install":
        df = plugins.install(args.path, where)
    elif args.action == "remove":
        df = plugins.remove(args.name, where)
    else:
        df = plugins.list(where)
    show(df, args.output)
    return failed(df)
