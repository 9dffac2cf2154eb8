"""`zy schedule add|list|cancel` and `zy series`: periodic collection from the shell (the
agents keep the schedule) and its samples as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import sys

from hcsdk._cliargs import ARG_HELP, arg_pairs
from hcsdk.cli_output import TARGETS_HELP, Subcommands, add_output, client, failed, show, targets


def register(sub: Subcommands) -> None:
    s = sub.add_parser("schedule", help="run a command on agents periodically (the agents keep the schedule)")
    ssub = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = ssub.add_parser("add", help="schedule CMD every PERIOD on targets (replaces one of the same name)")
    a.add_argument("cmd")
    a.add_argument("--every", required=True, help="'10s', '5m', '1h', '1d' or seconds")
    a.add_argument("-t", "--targets", required=True, help=TARGETS_HELP)
    a.add_argument("--arg", action="append", metavar="KEY=VALUE", help=ARG_HELP)
    a.add_argument("--name", help="default: CMD-EVERY")
    a.add_argument("--timeout", type=float, help="seconds per run (default: the period, at most 300)")
    ssub.add_parser("list", help="schedules, with sample counts")
    c = ssub.add_parser("cancel", help="stop a schedule on its agents (its samples stay)")
    c.add_argument("name")
    for q in ssub.choices.values():
        add_output(q)
        q.set_defaults(func=_cmd_schedule)


def register_series(sub: Subcommands) -> None:
    v = sub.add_parser("series", help="the samples of a schedule (time, uuid, hostname, fields...)")
    v.add_argument("name")
    v.add_argument("--since", help="ISO time or epoch seconds")
    add_output(v, default="csv")
    v.set_defaults(func=_cmd_series)


def _cmd_schedule(args: argparse.Namespace) -> int:
    zy = client()
    if args.action == "add":
        sched = zy.schedule(args.cmd, args.every, targets=targets(args.targets), args=arg_pairs(args.arg),
                            name=args.name, timeout=args.timeout)
        print(f"schedule {sched.name}: {sched.cmd} every {sched.every:g}s", file=sys.stderr)
        df = sched.agents()
    elif args.action == "cancel":
        answer = zy.cancel_schedule(args.name)
        print(f"cancelled schedule {answer['name']}")
        return 0
    else:
        df = zy.schedules()
    show(df, args.output)
    return failed(df)


def _cmd_series(args: argparse.Namespace) -> int:
    show(client().series(args.name, since=args.since), args.output)
    return 0
