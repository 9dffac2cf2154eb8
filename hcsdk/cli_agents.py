"""`zy agents update|revoke|disconnect`: agents in place. An update goes in batches with a
graceful handover, prints one row per agent and exits 1 when one did not update."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hcsdk.cli_output import TARGETS_HELP, Subcommands, add_output, client, failed, show, targets


def register(sub: Subcommands) -> None:
    p = sub.add_parser("agents", help="update, revoke or disconnect agents")
    asub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("revoke", "drop an agent and refuse it for good"),
                         ("disconnect", "close an agent's channel; it reconnects by itself")):
        a = asub.add_parser(action, help=text)
        a.add_argument("uuid")
        a.set_defaults(func=_cmd_agent_action, agent_action=action)

    u = asub.add_parser("update", help="update agents online to a build, in batches (graceful handover)")
    u.add_argument("-t", "--targets", required=True, help=TARGETS_HELP)
    u.add_argument("--build", required=True, type=Path, help="dist/zy-agent or dist/zy-agent.pyz (make agent)")
    u.add_argument("--batch-size", type=int, default=10, help="agents updated at once (default 10)")
    u.add_argument("--max-failures", type=int, default=0,
                   help="stop before the next batch once more than this many failed (default 0)")
    u.add_argument("--handover-timeout", type=float, default=60,
                   help="seconds the new build has to take over before it is rolled back (default 60)")
    add_output(u)
    u.set_defaults(func=_cmd_update)


def _cmd_agent_action(args: argparse.Namespace) -> int:
    getattr(client(), f"{args.agent_action}_agent")(args.uuid)
    print(f"{args.agent_action}: {args.uuid}")
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    def progress(p: dict[str, Any]) -> None:
        print(f"batch {p['batch']}: {p['done']}/{p['total']} done, {p['failures']} failed", file=sys.stderr)

    df = client().agents.update(targets(args.targets), args.build, batch_size=args.batch_size,
                                max_failures=args.max_failures, handover_timeout=args.handover_timeout,
                                progress=progress)
    show(df, args.output)
    return failed(df)
