"""What a plugin module uses: the ``command`` decorator, ``Arg`` for its arguments, and the
``Context`` each call receives. Stdlib only: plugins run in the agent's worker process, which
must start fast and small on any host.

A plugin is one module (or a package). Each function decorated with :func:`command` serves one
cmd word::

    from agent.plugins.api import Arg, Context, command

    VERSION = "1.2"

    @command("hello.greet", args={"name": Arg(str, default="world"), "times": Arg(int, default=1, min=1)})
    def greet(ctx: Context, name: str, times: int) -> dict:
        for _ in range(times):
            ctx.out(f"hello {name}\\n")
        return {"greeted": name}

Arguments are checked against the schema before the function runs: a bad argument is reported
as ``args.times must be at least 1 (got 0)``, never as a traceback. What the function returns
(a dict, or None) is the task's ``result``; raising :class:`PluginError` ends the task as
``error`` with that message; any other exception ends it as ``error`` with the exception.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# one definition for the built-in commands (hcsdk.protocol.vocab) and every plugin
from hcsdk.protocol.args import REQUIRED, Arg, ArgError, validate
from hcsdk.protocol.vocab import is_cmd_word

__all__ = ["MAX_RESULT", "REQUIRED", "Arg", "ArgError", "CommandSpec", "Context", "PluginError", "check_result",
           "command", "validate"]


class PluginError(Exception):
    """A plugin's clear, expected failure: the task ends as ``error`` with this message."""


@dataclass(frozen=True, kw_only=True)
class CommandSpec:
    """What a plugin declares for one cmd word."""

    cmd: str
    func: Callable[..., Any]
    args: dict[str, Arg] = field(default_factory=dict)
    streams: bool = False
    help: str = ""

    def describe(self) -> dict[str, Any]:
        return {"cmd": self.cmd, "streams": self.streams, "help": self.help,
                "args": {name: arg.describe() for name, arg in self.args.items()}}


def command(cmd: str, *, args: dict[str, Arg | type] | None = None, streams: bool = False,
            help: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare ``func`` as the handler of ``cmd``. ``args`` maps argument names to :class:`Arg`
    (a bare type is a required argument of that type). ``streams`` says the command sends output
    while it runs (``ctx.out``) rather than only a result at the end."""
    _check_cmd(cmd)
    schema = {name: spec if isinstance(spec, Arg) else Arg(spec) for name, spec in (args or {}).items()}

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        doc = (func.__doc__ or "").strip().splitlines()
        spec = CommandSpec(cmd=cmd, func=func, args=schema, streams=streams,
                           help=help if help is not None else (doc[0] if doc else ""))
        func.__zy_command__ = spec  # type: ignore[attr-defined]
        return func

    return mark


#: the largest result a command may return (the worker and the scheduler check it)
MAX_RESULT = 1024 * 1024
_INT_LIMIT = 2**63


def check_result(cmd: str, value: Any) -> None:
    """A result that cannot travel is the plugin's error, reported here, not a poison message
    later: JSON without NaN or infinities, integers within 64 bits, at most 1 MiB."""
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{cmd} returned a result that is not JSON: {exc}") from None
    if size > MAX_RESULT:
        raise PluginError(f"{cmd} returned {size} bytes of result; at most {MAX_RESULT} (stream big output "
                          "with ctx.out)")
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool) and not -_INT_LIMIT <= item < _INT_LIMIT:
            raise PluginError(f"{cmd} returned an integer beyond 64 bits ({str(item)[:30]}...): send it as a string")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_cmd(cmd: str) -> None:
    if not is_cmd_word(cmd):  # the channel's one rule for cmd words
        raise ValueError(f"cmd word {cmd!r} must be lowercase letters, digits and _ in dot-separated parts")


class Context:
    """What a running command can do: send output, check for cancellation, sleep politely."""

    def __init__(self, taskid: str, uuid: str, send: Callable[[str, str], None],
                 cancelled: threading.Event | None = None) -> None:
        self.taskid = taskid
        self.uuid = uuid
        self._send = send
        self.cancelled = cancelled or threading.Event()

    def out(self, text: str) -> None:
        """Send text on stdout now (it reaches the notebook while the command still runs)."""
        if text:
            self._send("stdout", text)

    def err(self, text: str) -> None:
        if text:
            self._send("stderr", text)

    def sleep(self, seconds: float) -> bool:
        """Sleep, waking early on cancel or timeout; False when the task should stop."""
        return not self.cancelled.wait(seconds)

    @property
    def stopping(self) -> bool:
        """True once the task was cancelled or timed out: a long loop should return."""
        return self.cancelled.is_set()
