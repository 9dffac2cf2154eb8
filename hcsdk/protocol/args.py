"""Argument schemas of commands: ``Arg`` (one argument's type, default, bounds) and ``validate``,
shared by the built-in commands (``vocab.BUILTIN_ARGS``) and every plugin (``agent.plugins.api``
re-exports them). Stdlib only: plugins run in the agent's worker process, which must start small.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

__all__ = ["REQUIRED", "Arg", "ArgError", "validate"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object"}
_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "booleans", list: "lists", dict: "objects"}


class ArgError(ValueError):
    """An argument does not match the command's schema."""


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

    def noun(self) -> str:
        """What the argument must be, in words: "a string", "a non-empty list of strings"."""
        if self.type is not list:
            return _TYPE_NAMES[self.type]
        what = "a non-empty list" if self.min is not None and self.min >= 1 else "a list"
        return what if self.items is None else f"{what} of {_PLURALS[self.items]}"

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
