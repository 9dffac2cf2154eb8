"""The `zy` command. hcsdk owns the frame and the SDK's own subcommands (run, inventory,
token, agents); services add theirs (master, agent, ...) through the ``hcsdk.commands``
entry-point group, so hcsdk imports none of them."""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ._version import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zy", description="hcsdk: a command channel for hybrid clouds")
    parser.add_argument("--version", action="version", version=f"zy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a script on targets and print a table of results",
                       description="Run a script on targets. Exits 1 if any target did not end 'ok'.")
    p.add_argument("-t", "--targets", required=True,
                   help="a uuid or hostname, a glob on either ('web-*'), a label selector ('label:role=web,idc=hk'), "
                   "or a comma-separated list of uuids and hostnames")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the command is killed (default 600)")
    p.add_argument("--cmd", default="shell",
                   help="cmd word: shell (default: the script through /bin/sh), exec (argv, no shell), ping, facts, "
                   "echo, or a plugin's (file.read, log.tail, ...)")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE",
                   help="a command argument: KEY=TEXT, or KEY:=JSON for numbers, booleans and lists (repeatable)")
    p.add_argument("--output", choices=["table", "full", "json"], default="table",
                   help="table: first line of output; full: all output; json: one JSON record per target")
    p.add_argument("script", nargs=argparse.REMAINDER, help="after --: the script (shell) or argv (exec)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("inventory", help="list enrolled agents")
    p.add_argument("selector", nargs="?",
                   help="only these: a glob ('web-*'), a label selector ('label:role=web'), a uuid or hostname")
    p.set_defaults(func=_cmd_inventory)

    p = sub.add_parser("token", help="create, list and revoke join tokens")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = tsub.add_parser("create", help="print a new join token")
    c.add_argument("--ttl", default="24h", help="lifetime: seconds or 30m, 24h, 7d (default 24h)")
    c.add_argument("--description", default="")
    c.add_argument("--proxy", action="append", default=[], metavar="URL",
                   help="agents joining with this token connect through these proxies (repeatable)")
    c.set_defaults(func=_cmd_token_create)
    tsub.add_parser("list", help="list join tokens").set_defaults(func=_cmd_token_list)
    r = tsub.add_parser("revoke", help="revoke a join token by id")
    r.add_argument("id")
    r.set_defaults(func=_cmd_token_revoke)

    p = sub.add_parser("fleet", help="start or stop a local fleet (a master and agents) for trying things out",
                       description="A local fleet: a master (SQLite, its own CA) and a few labelled agents as "
                       "background processes under --root. Used by the quickstart, the notebooks and the tests.")
    fsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = fsub.add_parser("up", help="start it (does nothing if it is already running)")
    up.add_argument("--agents", type=int, default=4, help="how many agents (default 4: web-1..3 and db-1)")
    up.add_argument("--port", type=int, default=0, help="master port (default: a free one)")
    for fp in (up, fsub.add_parser("down", help="stop it"), fsub.add_parser("status", help="is it running?")):
        fp.add_argument("--root", type=Path, default=Path("state/fleet"), help="where it lives (default %(default)s)")
    p.set_defaults(func=_cmd_fleet)

    p = sub.add_parser("agents", help="update, revoke or disconnect agents")
    asub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("revoke", "drop an agent and refuse it for good"),
                         ("disconnect", "close an agent's channel; it reconnects by itself")):
        a = asub.add_parser(action, help=text)
        a.add_argument("uuid")
        a.set_defaults(func=_cmd_agent_action, agent_action=action)
    from . import cli_lifecycle

    cli_lifecycle.register(sub, asub)

    for ep in sorted(entry_points(group="hcsdk.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except ImportError as exc:  # a service installed without its dependencies
            sub.add_parser(ep.name, help=f"(unavailable: {exc})")
    return parser


def parse_duration(text: str) -> float:
    from ._duration import seconds

    try:
        return seconds(text)
    except ValueError:
        raise SystemExit(f"zy: cannot read {text!r} as a duration (use seconds or 30m, 24h, 7d)") from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ._errors import ZyError

    try:
        return int(args.func(args) or 0)
    except ZyError as exc:
        print(f"zy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _client() -> Any:
    from ._client import Client

    return Client()


def _console() -> Any:
    from rich.console import Console

    return Console()


def _cmd_run(args: argparse.Namespace) -> int:
    from ._cliargs import arg_pairs

    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    cmd = args.cmd
    if not script and cmd in ("shell", "exec"):
        raise SystemExit("zy run: give the script after --, e.g. zy run -t 'web-*' -- 'uptime'")
    targets: Any = args.targets
    if "," in targets and not targets.startswith("label:"):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    payload: Any = (" ".join(script) if cmd == "shell" else script) or None
    client = _client()
    run = client.run(payload, targets=targets, cmd=cmd, args=arg_pairs(args.arg), timeout=args.timeout)
    try:
        _follow(run)
    except KeyboardInterrupt:
        print(f"zy: cancelling run {run.id}", file=sys.stderr)
        run.cancel()
        raise
    df = run.to_dataframe()
    _print_results(df, args.output)
    return 0 if (df["status"] == "ok").all() else 1


def _follow(run: Any) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=_stderr_console()) as progress:
        bar = progress.add_task(f"run {run.id}", total=run.total)
        for event in run.events():
            if event.kind == "done":
                progress.advance(bar)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _print_results(df: Any, mode: str) -> None:
    if mode == "json":
        print(df.to_json(orient="records", lines=True, date_format="iso"))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_lines=mode == "full")
    for col in ("hostname", "uuid", "status", "exit", "duration", "output"):
        table.add_column(col, overflow="fold" if col == "output" else "ellipsis")
    colors = {"ok": "green", "failed": "red", "timeout": "yellow", "offline": "bright_black"}
    for row in df.itertuples():
        out = (row.stdout or "") + (row.stderr or "")
        if mode == "table":
            out = out.strip().splitlines()[0] if out.strip() else ""
        if row.error and row.status != "ok":
            out = f"{out}  ({row.error})" if out else f"({row.error})"
        code = "" if row.exit_code is None or str(row.exit_code) == "<NA>" else str(row.exit_code)
        dur = "" if row.duration_s != row.duration_s or row.duration_s is None else f"{row.duration_s:.2f}s"
        status = f"[{colors.get(row.status, 'magenta')}]{row.status}[/]"
        table.add_row(escape(row.hostname), row.uuid[:8], status, code, dur, escape(out))
    console = _console()
    console.print(table)
    counts = df["status"].value_counts().to_dict()
    console.print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def _cmd_inventory(args: argparse.Namespace) -> int:
    df = _client().inventory(args.selector)
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    for col in ("hostname", "uuid", "kind", "online", "mode", "via", "os", "last_seen", "labels"):
        table.add_column(col)
    for row in df.itertuples():
        labels = ",".join(f"{k}={v}" for k, v in (row.labels or {}).items())
        seen = "" if str(row.last_seen) == "NaT" else row.last_seen.strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(escape(row.hostname), row.uuid, row.kind, "yes" if row.online else "no", row.mode or "",
                      escape(" > ".join(row.via or [])), escape(row.os or ""), seen, escape(labels))
    _console().print(table)
    print(f"{len(df)} agents, {int(df['online'].sum()) if len(df) else 0} online")
    return 0


def _cmd_token_create(args: argparse.Namespace) -> int:
    token = _client().create_join_token(parse_duration(args.ttl), args.description, args.proxy)
    print(token["token"])
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(token["expires_at"]))
    print(f"# id {token['id']}, expires {expires}; CA {token['ca']}", file=sys.stderr)
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    for t in _client().join_tokens():
        expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["expires_at"]))
        print(f"{t['id']}  {t['state']:8}  expires {expires}  uses {t['uses']}  {t['description']}")
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    _client().revoke_join_token(args.id)
    print(f"revoked join token {args.id}")
    return 0


def _cmd_fleet(args: argparse.Namespace) -> int:
    from . import localfleet

    if args.action == "up":
        agents = localfleet.DEFAULT_AGENTS[: args.agents] + [
            (f"node-{i}", {"role": "node"}) for i in range(len(localfleet.DEFAULT_AGENTS) + 1, args.agents + 1)]
        state = localfleet.fleet_up(args.root, agents, args.port)
        print(f"fleet up: master {state['url']}, {len(state['pids']) - 1} agents under {state['root']}")
        print(f"export ZY_CONFIG={state['config']}")
        return 0
    if args.action == "down":
        stopped = localfleet.fleet_down(args.root)
        print(f"fleet down: stopped {', '.join(stopped)}" if stopped else "fleet down: nothing was running")
        return 0
    running = localfleet.fleet_status(args.root.resolve())
    if not running:
        print("fleet: not running")
        return 1
    print(f"fleet: master {running['url']}; " + ", ".join(
        f"{name} {'up' if up else 'DOWN'}" for name, up in running["alive"].items()))
    print(f"export ZY_CONFIG={running['config']}")
    return 0


def _cmd_agent_action(args: argparse.Namespace) -> int:
    client = _client()
    getattr(client, f"{args.agent_action}_agent")(args.uuid)
    print(f"{args.agent_action}: {args.uuid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
