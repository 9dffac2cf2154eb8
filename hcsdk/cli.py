"""The `zy` command. hcsdk owns the frame and the SDK's own subcommands (run, inventory,
token, fleet here; agents, plugins, schedule, artifact and series in the cli_* modules named
for them); services add theirs (master, agent, ...) through the ``hcsdk.commands``
entry-point group, so hcsdk imports none of them."""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hcsdk.common.version import __version__


class _Parser(argparse.ArgumentParser):
    """Every (sub)parser records itself in the namespace, so an error names the subcommand's
    usage: the deepest one parsed sets the attribute last. (``add_subparsers`` makes its
    children of the parent's class, so services' subcommands are recorded too.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(_zy_parser=self)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zy", description="hcsdk: a command channel for hybrid clouds")
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

    p = sub.add_parser("inventory", help="list enrolled agents",
                       description="List enrolled agents. The table fits 80 columns (short uuids); --wide shows "
                       "every column. A hostname marked * is shared by several agents: target those by uuid.")
    p.add_argument("selector", nargs="?",
                   help="only these: a glob ('web-*'), a label selector ('label:role=web'), a uuid or hostname")
    p.add_argument("--wide", action="store_true", help="all columns, full uuids, however wide")
    p.set_defaults(func=_cmd_inventory)

    p = sub.add_parser("token", help="create, list and revoke join tokens")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = tsub.add_parser("create", help="print a new join token")
    c.add_argument("--ttl", default="24h", help="lifetime: seconds or 30m, 24h, 7d (default 24h)")
    c.add_argument("--description", default="")
    c.add_argument("--proxy", "--master", dest="proxy", action="append", default=[], metavar="URL",
                   help="agents joining with this token connect through these proxies, or to these masters "
                   "(repeatable; default: every live master's URL), e.g. a DR master that is not running yet")
    c.add_argument("--kind", choices=["agent", "proxy"], default="agent",
                   help="what the token enrolls (default agent); the enrolling side cannot choose")
    c.add_argument("--proxy-name", action="append", default=[], metavar="HOST", dest="proxy_names",
                   help="a proxy token: a host the proxy serves, the only names its certificate may carry "
                   "(repeatable; required with --kind proxy)")
    c.add_argument("--uses", type=_uses, default=0, metavar="N",
                   help="enrollments the token allows (default: any number until it expires); 1: single use")
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

    from hcsdk import cli_agents, cli_artifacts, cli_plugins, cli_schedules

    # in this order: `zy --help` lists the commands as they are added
    cli_agents.register(sub)
    cli_plugins.register(sub)
    cli_schedules.register(sub)
    cli_artifacts.register(sub)
    cli_schedules.register_series(sub)

    for ep in sorted(entry_points(group="hcsdk.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except ImportError as exc:  # a service installed without its dependencies
            sub.add_parser(ep.name, help=f"(unavailable: {exc})")
    return parser


class CommandLineError(Exception):
    """A command line that cannot work: shown with that subcommand's usage, exit status 2 (the
    SDK's own ``UsageError`` raised later, by a call, prints as ``zy: ...`` like every ZyError)."""


def parse_duration(text: str) -> float:
    from hcsdk.common.duration import seconds

    try:
        return seconds(text)
    except ValueError:
        raise CommandLineError(f"cannot read {text!r} as a duration (use seconds or 30m, 24h, 7d)") from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # parse_args would report leftovers (`zy run --bogus`) with the top level's usage
    args, extra = parser.parse_known_args(argv)
    leaf: argparse.ArgumentParser = getattr(args, "_zy_parser", parser)
    if extra:
        leaf.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from hcsdk.common.errors import ZyError

    try:
        return int(args.func(args) or 0)
    except CommandLineError as exc:
        leaf.error(str(exc))  # exits 2, like every other usage error
    except ZyError as exc:
        print(f"zy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _client() -> Any:
    from hcsdk._client import Client

    return Client()


def _console() -> Any:
    from rich.console import Console

    return Console()


def _cmd_run(args: argparse.Namespace) -> int:
    from hcsdk._cliargs import arg_pairs
    from hcsdk.common.errors import UsageError

    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    cmd = args.cmd
    if not script and cmd in ("shell", "exec"):
        raise CommandLineError("give the script after --, e.g. zy run -t 'web-*' -- 'uptime'")
    targets: Any = args.targets
    if "," in targets and not targets.startswith("label:"):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    payload: Any = (" ".join(script) if cmd == "shell" else script) or None
    try:
        cmd_args = arg_pairs(args.arg)  # before the client: a typo is a usage error, master or not
    except UsageError as exc:
        raise CommandLineError(str(exc)) from None
    client = _client()
    run = client.run(payload, targets=targets, cmd=cmd, args=cmd_args, timeout=args.timeout)
    try:
        _follow(run)
    except KeyboardInterrupt:
        print(f"zy: cancelling run {run.id}", file=sys.stderr)
        run.cancel()
        raise
    from hcsdk.protocol.tasks import TaskStatus

    df = run.to_dataframe()
    _print_results(df, args.output)
    return 0 if (df["status"] == TaskStatus.OK.value).all() else 1


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

    from hcsdk.protocol.tasks import TaskStatus

    table = Table(show_lines=mode == "full")
    for col in ("hostname", "uuid", "status", "exit", "duration", "output"):
        table.add_column(col, overflow="fold" if col == "output" else "ellipsis")
    colors = {TaskStatus.OK: "green", TaskStatus.FAILED: "red", TaskStatus.TIMEOUT: "yellow",
              TaskStatus.OFFLINE: "bright_black"}
    for row in df.itertuples():
        out = (row.stdout or "") + (row.stderr or "")
        if mode == "table":
            out = out.strip().splitlines()[0] if out.strip() else ""
        if row.error and row.status != TaskStatus.OK:
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
    shared = {h for h, n in df["hostname"].value_counts().items() if n > 1}
    now = time.time()
    cols = (["hostname", "uuid", "kind", "online", "mode", "via", "os", "last_seen", "version", "labels"]
            if args.wide else ["hostname", "uuid", "online", "seen", "via", "labels"])
    rows = []
    for row in df.itertuples():
        cells = {
            "hostname": row.hostname + ("*" if row.hostname in shared else ""),
            "uuid": row.uuid if args.wide else row.uuid[:8],
            "kind": row.kind, "online": "yes" if row.online else "no", "mode": row.mode or "",
            "via": " > ".join(row.via or []) or "-", "os": row.os or "", "version": str(row.agent_version or ""),
            "last_seen": "" if str(row.last_seen) == "NaT" else row.last_seen.strftime("%Y-%m-%d %H:%M:%S"),
            "seen": "" if str(row.last_seen) == "NaT" else _ago(now - row.last_seen.timestamp()),
            "labels": ",".join(f"{k}={v}" for k, v in (row.labels or {}).items()),
        }
        rows.append([cells[c] for c in cols])
    width = None if args.wide else _console().width
    for line in _fit_table(cols, rows, width, flexible=("hostname", "via", "labels")):
        print(line)
    print(f"{len(df)} agent{'' if len(df) == 1 else 's'}, {int(df['online'].sum()) if len(df) else 0} online")
    for host in sorted(shared):
        print(f"* {int((df['hostname'] == host).sum())} agents share the hostname {host!r}; target them by uuid")
    return 0


def _fit_table(header: list[str], rows: list[list[str]], width: int | None,
               flexible: tuple[str, ...]) -> list[str]:
    """Plain columns, two spaces apart, one line per row. With ``width``, the ``flexible``
    columns give way (widest first, cut with …) until a line fits; the others never shrink."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    if width is not None:
        floor = {i: max(len(header[i]), 4) for i, h in enumerate(header) if h in flexible}
        excess = sum(widths) + 2 * (len(widths) - 1) - width
        while excess > 0:
            shrinkable = [i for i in floor if widths[i] > floor[i]]
            if not shrinkable:
                break
            widest = max(shrinkable, key=lambda i: widths[i])
            widths[widest] -= 1
            excess -= 1

    def line(cells: list[str]) -> str:
        cut = [c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(cells, widths, strict=True)]
        return "  ".join(c.ljust(w) for c, w in zip(cut, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _ago(seconds: float) -> str:
    """``4s``, ``12m``, ``3h``, ``2d``: short enough for an 80-column table."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def _uses(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--uses wants a whole number of at least 1, got {text!r}")
    return int(text)


def _cmd_token_create(args: argparse.Namespace) -> int:
    if args.kind == "proxy" and not args.proxy_names:
        print("zy token create: a proxy token needs --proxy-name HOST (the hosts that proxy serves)", file=sys.stderr)
        return 2
    if args.kind == "agent" and args.proxy_names:
        print("zy token create: --proxy-name is for --kind proxy", file=sys.stderr)
        return 2
    ttl = parse_duration(args.ttl)  # a bad --ttl is a usage error before any master is asked
    token = _client().create_join_token(ttl, args.description, args.proxy, kind=args.kind,
                                        proxy_names=args.proxy_names, uses=args.uses)
    print(token["token"])
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(token["expires_at"]))
    limit = f"{args.uses} use(s)" if args.uses else "any number of uses"
    names = f" for {', '.join(args.proxy_names)}" if args.proxy_names else ""
    print(f"# id {token['id']}, {args.kind} token{names}, {limit}, expires {expires}; CA {token['ca']}",
          file=sys.stderr)
    print("# keep it out of command lines: save it to a file (0600) for --join-file, or pass it in ZY_JOIN_TOKEN",
          file=sys.stderr)
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    rows = [("ID", "KIND", "USES", "EXPIRES", "STATE", "DESCRIPTION")]
    for t in _client().join_tokens():
        expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(t["expires_at"]))
        uses = f"{t['uses']}/{t['max_uses'] or '-'}"
        kind = t.get("kind", "agent")
        description = t["description"] + (f" [{', '.join(t['proxy_names'])}]" if t.get("proxy_names") else "")
        rows.append((t["id"], kind, uses, expires, t["state"], description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    _client().revoke_join_token(args.id)
    print(f"revoked join token {args.id}")
    return 0


def _cmd_fleet(args: argparse.Namespace) -> int:
    from hcsdk import localfleet

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


if __name__ == "__main__":
    sys.exit(main())
