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

import builtins
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REQUIRED", "Arg", "ArgError", "CommandSpec", "Context", "PluginError", "command", "validate"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object"}


class ArgError(ValueError):
    """An argument does not match the command's schema."""


class PluginError(Exception):
    """A plugin's clear, expected failure: the task ends as ``error`` with this message."""


@dataclass(frozen=True, kw_only=True)
class Arg:
    """One argument: its type (str, int, float, bool, list or dict), a default (omit it for a
    required argument), and optional bounds (``min``/``max`` on numbers and on the length of
    strings and lists) or ``choices``."""

    type: builtins.type
    default: Any = REQUIRED
    help: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    items: builtins.type | None = None  # element type of a list

    def __init__(self, type: builtins.type, default: Any = REQUIRED, help: str = "", *,
                 min: float | None = None, max: float | None = None,
                 choices: tuple[Any, ...] | list[Any] | None = None, items: builtins.type | None = None) -> None:
        if type not in _TYPE_NAMES:
            raise TypeError(f"Arg type must be one of str, int, float, bool, list, dict (got {type!r})")
        for name, value in (("type", type), ("default", default), ("help", help), ("min", min), ("max", max),
                            ("choices", tuple(choices) if choices is not None else None), ("items", items)):
            object.__setattr__(self, name, value)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type.__name__}
        if not self.required:
            out["default"] = self.default
        for key in ("help", "min", "max", "choices"):
            value = getattr(self, key)
            if value not in (None, ""):
                out[key] = list(value) if key == "choices" else value
        if self.items is not None:
            out["items"] = self.items.__name__
        return out

    def check(self, name: str, value: Any) -> Any:
        want, original = self.type, value
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ArgError(f"args.{name} must be {_TYPE_NAMES[want]} (got {value!r})")
        if self.choices is not None and value not in self.choices:
            raise ArgError(f"args.{name} must be one of {', '.join(map(repr, self.choices))} (got {value!r})")
        size = original if want in (int, float) else len(value) if want in (str, list) else None
        what = "" if want in (int, float) else "the length of "
        if size is not None and self.min is not None and size < self.min:
            raise ArgError(f"{what}args.{name} must be at least {self.min:g} (got {size!r})")
        if size is not None and self.max is not None and size > self.max:
            raise ArgError(f"{what}args.{name} must be at most {self.max:g} (got {size!r})")
        if want is list and self.items is not None:
            for i, item in enumerate(value):
                if not isinstance(item, self.items) or (self.items is int and isinstance(item, bool)):
                    raise ArgError(f"args.{name}[{i}] must be {_TYPE_NAMES[self.items]} (got {item!r})")
        return value


def validate(schema: dict[str, Arg], args: Any) -> dict[str, Any]:
    """Check ``args`` against ``schema``; the defaults filled in. Raises :class:`ArgError`."""
    if not isinstance(args, dict):
        raise ArgError(f"args must be an object (got {type(args).__name__})")
    unknown = sorted(set(args) - set(schema))
    if unknown:
        takes = ", ".join(sorted(schema)) or "no arguments"
        raise ArgError(f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (takes: {takes})")
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if name in args:
            out[name] = spec.check(name, args[name])
        elif spec.required:
            raise ArgError(f"args.{name} is required ({_TYPE_NAMES[spec.type]})")
        else:
            out[name] = spec.default
    return out


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


def _check_cmd(cmd: str) -> None:
    parts = cmd.split(".")
    if not cmd or len(cmd) > 64 or not all(p and p[0].isalpha() and p.replace("_", "").isalnum() and p.isascii()
                                           and p.lower() == p for p in parts):
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
