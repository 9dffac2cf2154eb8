"""`zy plugins`, `zy agents update`, `zy schedule` and `zy series`: the agent lifecycle from the
shell. Each prints a table (or CSV/JSON with --output) and exits 1 when a target failed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hcsdk._cliargs import ARG_HELP, arg_pairs

TARGETS_HELP = "a uuid or hostname, a glob ('web-*'), a label selector ('label:role=web'), or a comma-separated list"


def register(sub: argparse._SubParsersAction, agents: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("plugins", help="install, list and remove plugins on agents (hot-loaded, no restart)")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = psub.add_parser("install", help="install or replace a plugin (.py file, package dir or module name)")
    i.add_argument("path")
    r = psub.add_parser("remove", help="remove an installed plugin")
    r.add_argument("name")
    ls = psub.add_parser("list", help="every plugin on every target, with versions")
    for q in (i, r, ls):
        q.add_argument("-t", "--targets", required=True, help=TARGETS_HELP)
        _output(q)
        q.set_defaults(func=_cmd_plugins)

    u = agents.add_parser("update", help="update agents online to a build, in batches (graceful handover)")
    u.add_argument("-t", "--targets", required=True, help=TARGETS_HELP)
    u.add_argument("--build", required=True, type=Path, help="dist/zy-agent or dist/zy-agent.pyz (make agent)")
    u.add_argument("--batch-size", type=int, default=10, help="agents updated at once (default 10)")
    u.add_argument("--max-failures", type=int, default=0,
                   help="stop before the next batch once more than this many failed (default 0)")
    u.add_argument("--handover-timeout", type=float, default=60,
                   help="seconds the new build has to take over before it is rolled back (default 60)")
    _output(u)
    u.set_defaults(func=_cmd_update)

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
        _output(q)
        q.set_defaults(func=_cmd_schedule)

    ar = sub.add_parser("artifact", help="files on the master to release: upload (resumable) and list")
    arsub = ar.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = arsub.add_parser("upload", help="store a file as an artifact (only missing chunks travel)")
    up.add_argument("path", type=Path)
    up.add_argument("--name", help="default: the file's name")
    _output(up)
    al = arsub.add_parser("list", help="artifacts, newest last")
    _output(al)
    for q in (up, al):
        q.set_defaults(func=_cmd_artifact)

    v = sub.add_parser("series", help="the samples of a schedule (time, uuid, hostname, fields...)")
    v.add_argument("name")
    v.add_argument("--since", help="ISO time or epoch seconds")
    _output(v, default="csv")
    v.set_defaults(func=_cmd_series)


def _output(p: argparse.ArgumentParser, default: str = "table") -> None:
    p.add_argument("--output", choices=["table", "csv", "json"], default=default, help=f"(default {default})")


def _targets(text: str) -> Any:
    if "," in text and not text.startswith("label:"):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def _client() -> Any:
    from hcsdk._client import Client

    return Client()


def _show(df: Any, output: str) -> None:
    if output == "csv":
        df.to_csv(sys.stdout)
        return
    if output == "json":
        print(df.to_json(orient="records", lines=True, date_format="iso"))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    for col in df.columns:
        table.add_column(str(col), overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*[escape("" if v is None or v != v else ", ".join(map(str, v)) if isinstance(v, list) else str(v))
                        for v in row])
    Console().print(table)


def _failed(df: Any) -> int:
    return 1 if "status" in df.columns and (df["status"] != "ok").any() else 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    plugins = _client().plugins
    targets = _targets(args.targets)
    if args.action == "install":
        df = plugins.install(args.path, targets)
    elif args.action == "remove":
        df = plugins.remove(args.name, targets)
    else:
        df = plugins.list(targets)
    _show(df, args.output)
    return _failed(df)


def _cmd_update(args: argparse.Namespace) -> int:
    def progress(p: dict[str, Any]) -> None:
        print(f"batch {p['batch']}: {p['done']}/{p['total']} done, {p['failures']} failed", file=sys.stderr)

    df = _client().agents.update(_targets(args.targets), args.build, batch_size=args.batch_size,
                                 max_failures=args.max_failures, handover_timeout=args.handover_timeout,
                                 progress=progress)
    _show(df, args.output)
    return _failed(df)


def _cmd_schedule(args: argparse.Namespace) -> int:
    client = _client()
    if args.action == "add":
        sched = client.schedule(args.cmd, args.every, targets=_targets(args.targets), args=arg_pairs(args.arg),
                                name=args.name, timeout=args.timeout)
        print(f"schedule {sched.name}: {sched.cmd} every {sched.every:g}s", file=sys.stderr)
        df = sched.agents()
    elif args.action == "cancel":
        answer = client.cancel_schedule(args.name)
        print(f"cancelled schedule {answer['name']}")
        return 0
    else:
        df = client.schedules()
    _show(df, args.output)
    return _failed(df)


def _cmd_series(args: argparse.Namespace) -> int:
    _show(_client().series(args.name, since=args.since), args.output)
    return 0


def _cmd_artifact(args: argparse.Namespace) -> int:
    import pandas as pd

    artifacts = _client().artifacts
    if args.action == "list":
        _show(artifacts.list(), args.output)
        return 0
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True, console=_stderr()) as bar:
        task = bar.add_task(f"upload {args.path.name}", total=None)
        info = artifacts.upload(args.path, name=args.name,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    _show(pd.DataFrame([info]), args.output)
    return 0


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True)
