"""``--arg`` for plugin commands, shared by `zy` and `%%zyrun`, in httpie's convention:
``KEY=VALUE`` passes VALUE as a string, ``KEY:=JSON`` passes a JSON value (numbers, true/false,
lists, objects)."""

from __future__ import annotations

import json
from typing import Any

from hcsdk.common.errors import UsageError

__all__ = ["ARG_HELP", "arg_pairs"]

ARG_HELP = "a command argument: KEY=TEXT, or KEY:=JSON for numbers, booleans and lists (repeatable)"


def arg_pairs(items: list[str] | None) -> dict[str, Any]:
    """``["path=/etc/hosts", "lines:=20"]`` -> ``{"path": "/etc/hosts", "lines": 20}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip(":").strip():
            raise UsageError(f"--arg wants KEY=TEXT or KEY:=JSON, got {item!r}")
        if key.endswith(":"):
            key = key[:-1]
            try:
                out[key.strip()] = json.loads(raw)
            except ValueError as exc:
                raise UsageError(f"--arg {item!r}: the value after := is not JSON ({exc})") from None
        else:
            out[key.strip()] = raw
    return out
