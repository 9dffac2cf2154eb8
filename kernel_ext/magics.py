"""``%%zyrun``, ``%zyrun``, ``%zyconnect``, ``%zyinventory``: hcsdk in IPython and Jupyter.

Settings are traitlets, so ``%config ZyRun.timeout = 30`` works as IPython users expect.
Errors a person can act on (unknown target, master unreachable, auth) are one-line
``UsageError``s, not traceback walls. No protocol logic lives here: it all goes through hcsdk.
"""

from __future__ import annotations

import argparse
import keyword
import re
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand
from traitlets import Bool, CaselessStrEnum, Float, Int, Unicode

from hcsdk import readable

from .follow import BackgroundRun, Follower
from .interpolate import InterpolationError, interpolate
from .views import NullView, TextView, View, WidgetView, grouped_output

USAGE = """\
%%zyrun [-t TARGETS] [--cmd WORD] [--arg KEY=VALUE ...] [--timeout S] [-o VAR] [--bg] [--quiet] [--show-output]
%zyrun  [options] -- COMMAND

Run the cell body (or COMMAND) on TARGETS and collect the results into a DataFrame.

TARGETS is a uuid or hostname, a glob ('web-*'), a label selector ('label:role=web'), a
comma-separated list, or the name of a variable holding one of those, a list of uuids, or a
DataFrame with a 'uuid' column. {name} in the options and the body is replaced from your namespace; {{ and }}
are literal braces; ${VAR} and $VAR are left to the shell.

The results are shown at the end in a readable view (hostname first, short uuids, output with
its line breaks, local times, status in colour); the DataFrame behind it, exactly as
run.to_dataframe() makes it, is bound to _zy (and to VAR with -o). Interrupting the
kernel cancels the run on every target. --bg returns at once with a handle: handle.df fills
in as results arrive, handle.wait() returns the final DataFrame.
"""


class _HelpShown(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"{message}\n\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise _HelpShown()


def _parser() -> _Parser:
    p = _Parser(prog="%%zyrun", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
                add_help=True)
    p.add_argument("-t", "--targets", help="where to run (default: ZyRun.targets)")
    p.add_argument("--cmd", default="shell",
                   help="cmd word: shell (default), exec, ping, facts, echo, or a plugin's (file.read, log.tail, ...)")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE",
                   help="a command argument: KEY=TEXT, or KEY:=JSON for numbers, booleans and lists (repeatable)")
    p.add_argument("--timeout", type=float, help="seconds before the command is killed (default: ZyRun.timeout)")
    p.add_argument("-o", "--out", metavar="VAR", help="also bind the result (or, with --bg, the handle) to VAR")
    p.add_argument("--bg", action="store_true", help="return at once; the handle fills in while you work")
    p.add_argument("--quiet", action="store_true", help="no progress view and no table at the end")
    p.add_argument("--show-output", action="store_true", help="print output grouped by identical text")
    p.add_argument("command", nargs=argparse.REMAINDER, help="(line magic) the command, after --")
    return p


@magics_class
class ZyRun(Magics):
    """hcsdk magics. Settings: ``%config ZyRun``."""

    timeout = Float(600.0, help="Default timeout in seconds for %%zyrun.").tag(config=True)
    targets = Unicode("", help="Default targets when -t is not given.").tag(config=True)
    widgets = CaselessStrEnum(["auto", "on", "off"], default_value="auto",
                              help="Live widgets: auto (in a Jupyter kernel), on, or off (text line).").tag(config=True)
    update_interval = Float(0.3, help="Seconds between progress updates (keeps IOPub traffic low).").tag(config=True)
    table_rows = Int(50, help="Rows shown in the live table (the DataFrame has them all).").tag(config=True)
    connect_timeout = Float(30.0, help="Seconds to wait for the master on each request.").tag(config=True)
    show_output = Bool(False, help="Always print output grouped by identical text.").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self._client: Any = None

    @property
    def _ns(self) -> dict[str, Any]:
        assert self.shell is not None, "the magics need an IPython shell"
        return self.shell.user_ns  # type: ignore[no-any-return]

    # -- connection ---------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            from hcsdk import Client, ZyError

            try:
                self._client = Client(timeout=self.connect_timeout)
            except ZyError as exc:
                raise UsageError(f"{exc}\n(or connect with %zyconnect URL --token T --ca PATH)") from None
        return self._client

    @line_magic
    def zyconnect(self, line: str) -> str:
        """%zyconnect [URL] [--token T] [--ca PATH]: talk to this master from now on.

        Without a URL, the client config is used (ZY_CONFIG, ZY_MASTER/ZY_TOKEN/ZY_CA, or
        ~/.config/zy/client.toml)."""
        from hcsdk import Client, ZyError

        p = _Parser(prog="%zyconnect", add_help=True)
        p.add_argument("url", nargs="?")
        p.add_argument("--token")
        p.add_argument("--ca")
        try:
            args = p.parse_args(shlex.split(line))
        except _HelpShown:
            return ""
        try:
            client = Client(args.url, token=args.token, ca=args.ca, timeout=self.connect_timeout)
        except ZyError as exc:
            raise UsageError(str(exc)) from None
        try:
            status = client.status()
        except ZyError as exc:
            client.close()
            raise UsageError(str(exc)) from None
        if self._client is not None:
            self._client.close()
        self._client = client
        return f"connected to {client.url}: {status['agents_online']} agents online"

    @line_magic
    def zyinventory(self, line: str) -> Any:
        """%zyinventory [SELECTOR]: the inventory as a DataFrame (all agents, or those a glob,
        label selector, uuid or hostname selects)."""
        from hcsdk import ZyError

        try:
            return self.client.inventory(line.strip() or None)
        except ZyError as exc:
            raise UsageError(str(exc)) from None

    # -- running ------------------------------------------------------------------------------
    @no_var_expand  # IPython would expand $VAR in the line; those belong to the shell
    @line_cell_magic
    def zyrun(self, line: str, cell: str | None = None) -> Any:
        options, command = split_line(line)
        try:
            # split first, then expand each word: a value with spaces stays one option
            words = [self._expand(w) for w in shlex.split(options)]
        except ValueError as exc:  # shlex: unbalanced quotes
            raise UsageError(f"cannot parse the options: {exc}") from None
        try:
            args = _parser().parse_args(words)
        except _HelpShown:  # argparse has printed the help
            return None
        if args.command:
            raise UsageError(f"unexpected words on the line: {' '.join(args.command)!r} "
                             "(the command goes after --, or in the cell)")
        if cell is not None and command.strip():
            raise UsageError(f"unexpected words on the %%zyrun line: {command.strip()!r} (the command goes in "
                             "the cell)")
        body = self._expand(command if cell is None else cell)
        if not body.strip() and args.cmd in ("shell", "exec"):
            raise UsageError("nothing to run: give a cell body, or a command after -- on the line")
        if args.out and (not args.out.isidentifier() or keyword.iskeyword(args.out)):
            raise UsageError(f"-o wants a variable name, got {args.out!r}")
        return self._run(args, body)

    def _expand(self, text: str) -> str:
        try:
            return interpolate(text, self._ns)
        except InterpolationError as exc:
            raise UsageError(str(exc)) from None

    def resolve_targets(self, spec: str | None) -> Any:
        """What ``-t SPEC`` names (default ``ZyRun.targets``): a notebook variable holding
        targets, a comma-separated list, or the expression itself; ``%zyrelease`` uses it too."""
        spec = spec or self.targets
        if not spec:
            raise UsageError("no targets: use -t TARGETS or %config ZyRun.targets = '...'")
        value = self._ns.get(spec) if spec.isidentifier() else None
        if isinstance(value, str):
            spec = value  # a variable holding an expression, e.g. targets = "label:role=web"
        elif value is not None and (
                hasattr(value, "columns") or isinstance(value, (list, tuple, set)) or hasattr(value, "tolist")):
            return value
        if "," in spec and not spec.startswith("label:"):
            return [s.strip() for s in spec.split(",") if s.strip()]
        return spec

    def _payload(self, cmd: str, body: str) -> Any:
        if cmd == "exec":
            try:
                return shlex.split(body)
            except ValueError as exc:
                raise UsageError(f"cannot split the exec command into words: {exc}") from None
        if cmd == "shell":
            return body
        return None

    def _run(self, args: argparse.Namespace, body: str) -> Any:
        from hcsdk import ZyError, arg_pairs

        targets = self.resolve_targets(args.targets)
        widgets = not args.quiet and self.widgets_wanted()  # imports ipywidgets before the run exists
        try:
            run = self.client.run(self._payload(args.cmd, body), targets=targets, cmd=args.cmd,
                                  args=arg_pairs(args.arg), timeout=args.timeout or self.timeout)
        except ZyError as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:  # the SDK has cancelled a run that was already created
            print("zyrun: interrupted while starting; the run was cancelled on the master")
            raise
        # From here on the run exists on the master: an interrupt anywhere must cancel it.
        follower: Follower | None = None
        try:
            view = self._view(run, args.quiet or (args.bg and not widgets), widgets)
            follower = Follower(run, view, self.update_interval, render_in_thread=args.bg)
            if args.bg:
                handle = BackgroundRun(_Readable(run), follower)
                self._bind(args, handle)
                return handle
            follower.wait_rendering()
        except KeyboardInterrupt:
            self._interrupted(run, follower)
            raise
        except ZyError as exc:
            self._ns["_zy"] = readable(run.snapshot())  # what arrived before the trouble is kept
            raise UsageError(f"run {run.id}: {exc} (results so far are in _zy)") from None
        except Exception:
            # a bug of ours must not leave commands running on the targets
            self._ns["_zy"] = readable(run.snapshot())
            _cancel_quietly(run)
            raise
        # the DataFrame as to_dataframe() makes it; only how IPython shows it is the readable view
        df = readable(run.snapshot())
        self._bind(args, df)
        if args.show_output or self.show_output:
            print(grouped_output(df))
        return None if args.quiet else df

    def _view(self, run: Any, quiet: bool, widgets: bool) -> View:
        if quiet:
            return NullView(run)
        if widgets:
            view = WidgetView(run, self.table_rows)
            view.show()
            return view
        return TextView(run, live=type(self.shell).__name__ == "ZMQInteractiveShell")

    def widgets_wanted(self) -> bool:
        """Whether runs show as live widgets here (the ``widgets`` option; by default in a Jupyter
        kernel with ipywidgets installed); ``%zyrelease`` asks it too."""
        if self.widgets == "off":
            return False
        if self.widgets == "on":
            return True
        if type(self.shell).__name__ != "ZMQInteractiveShell":
            return False
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            return False
        return True

    def _interrupted(self, run: Any, follower: Follower | None) -> None:
        """Ctrl-C / the stop button: cancel on the master, so nothing keeps running on hosts."""
        try:
            self._cancel_and_wait(run, follower)
        except KeyboardInterrupt:  # impatient second Ctrl-C: the cancel has been sent already
            print(f"zyrun: interrupted; cancel of run {run.id} sent to the master")
        self._ns["_zy"] = readable(run.snapshot())

    def _cancel_and_wait(self, run: Any, follower: Follower | None) -> None:
        try:
            n = run.cancel()
            if follower is not None:
                follower.done.wait(15)
                follower.view.render(final=True)
            else:
                run.wait(15)
            print(f"zyrun: interrupted; cancelled run {run.id} on the master ({n} targets were still running)")
        except Exception as exc:  # the master may be the reason for the interrupt
            print(f"zyrun: interrupted, but cancelling run {run.id} failed: {exc}")

    def _bind(self, args: argparse.Namespace, value: Any) -> None:
        self._ns["_zy"] = value
        if args.out:
            self._ns[args.out] = value


ZyRun.zyrun.__doc__ = USAGE

_OPTION = re.compile(r"""\s*(?:(?:-t|--targets|--cmd|--arg|--timeout|-o|--out)(?:\s+|=)(?:"[^"]*"|'[^']*'|\S+)"""
                     r"""|--bg|--quiet|--show-output|-h|--help)(?=\s|$)""")


def split_line(line: str) -> tuple[str, str]:
    """The options at the start of a %zyrun line, and the command after them, verbatim
    (quotes, pipes and $VARs untouched; a leading ``--`` is dropped)."""
    pos = 0
    while match := _OPTION.match(line, pos):
        pos = match.end()
    rest = line[pos:].lstrip()
    if rest == "--" or rest.startswith("-- "):
        rest = rest[2:].lstrip()
    elif rest.startswith("-"):  # an unknown option: let argparse say so
        return line, ""
    return line[:pos], rest


class _Readable:
    """The run as --bg's handle sees it: its snapshots (handle.df, handle.wait()) show as the
    readable view, like the DataFrame a foreground %%zyrun returns."""

    def __init__(self, run: Any):
        self._run = run

    def snapshot(self) -> Any:
        return readable(self._run.snapshot())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)


def _cancel_quietly(run: Any) -> None:
    try:
        run.cancel()
    except Exception:  # already failing; the original error matters more
        pass
