"""``%zyrelease``: start a sharded rollout, or show one, with a live widget (Pause, Continue,
Abort, Rollback). Everything goes through the SDK's ``Client.release``."""

from __future__ import annotations

import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand

from .magics import _HelpShown, _Parser

USAGE = """%zyrelease ARTIFACT -t TARGETS --dest PATH [--batch N|P%] [--pre S] [--post S] [--health S]
           [--rollback S] [--max-failures N|P%] [--pause-between 30s] [--timeout S] [-o VAR] [--wait]
%zyrelease RELEASE          show a release you have (a variable holding one, or its id)

Starts (or shows) a release and a live widget: shards advancing, each target's phase, and
buttons to pause, continue, abort or roll back. The Release object is returned and bound to
`_zyrelease` (and to VAR with -o). Where widgets cannot render, it waits and prints a line.
"""


def _parser() -> _Parser:
    p = _Parser(prog="%zyrelease", add_help=True, description=USAGE)
    p.add_argument("artifact", help="artifact id or name; or a Release variable / release id to show")
    p.add_argument("-t", "--targets")
    p.add_argument("--dest", help="absolute path on the targets ({hostname} and {uuid} are each one's own)")
    p.add_argument("--batch", default="10")
    for step in ("pre", "post", "health", "rollback"):
        p.add_argument(f"--{step}", help=f"shell command for the {step} step")
    p.add_argument("--max-failures", default="0")
    p.add_argument("--pause-between", default="0")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("-o", "--out")
    p.add_argument("--wait", action="store_true", help="block until the release is over or paused")
    return p


def _count_or_share(text: str) -> int | str:
    return text if text.endswith("%") else int(text)


@magics_class
class ZyRelease(Magics):
    @property
    def _ip(self) -> Any:
        assert self.shell is not None, "the magics need an IPython shell"
        return self.shell

    @no_var_expand
    @line_magic
    def zyrelease(self, line: str) -> Any:
        try:
            args = _parser().parse_args(shlex.split(line))
        except _HelpShown:
            return None
        except ValueError as exc:
            raise UsageError(f"cannot parse the options: {exc}") from None
        release = self._existing(args.artifact) if args.targets is None else self._start(args)
        self._ip.user_ns["_zyrelease"] = release
        if args.out:
            self._ip.user_ns[args.out] = release
        runner = self._ip.magics_manager.registry["ZyRun"]
        if runner.widgets_wanted():
            from .release_view import ReleaseWidget

            widget = ReleaseWidget(release)
            widget.show()
            widget.follow()
            if args.wait:
                release.wait()
                widget.render(release.refresh())
        else:
            from .release_view import release_line

            release.wait()
            print(release_line(release.info))
        return release

    def _client(self) -> Any:
        return self._ip.magics_manager.registry["ZyRun"].client

    def _existing(self, ref: str) -> Any:
        from hcsdk import Release, ZyError

        value = self._ip.user_ns.get(ref) if ref.isidentifier() else None
        if isinstance(value, Release):
            return value
        try:
            return self._client().get_release(ref)
        except ZyError as exc:
            raise UsageError(f"{exc} (start one with %zyrelease ARTIFACT -t TARGETS --dest PATH)") from None

    def _start(self, args: Any) -> Any:
        from hcsdk import ZyError

        if not args.dest:
            raise UsageError("--dest PATH is needed to start a release")
        targets = self._ip.magics_manager.registry["ZyRun"].resolve_targets(args.targets)
        try:
            return self._client().release(
                args.artifact, targets, dest=args.dest, batch=_count_or_share(args.batch), pre=args.pre,
                post=args.post, health=args.health, rollback=args.rollback,
                max_failures=_count_or_share(args.max_failures), pause_between=args.pause_between,
                timeout=args.timeout)
        except (ZyError, ValueError) as exc:
            raise UsageError(str(exc)) from None
