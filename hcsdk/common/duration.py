"""Durations as people write them: ``"500ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"7d"`` or plain
seconds; one reading for the SDK (schedules, release pauses) and the command line (token TTLs)."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)


def seconds(value: str | float) -> float:
    """The seconds in ``value``; ValueError when it is not a duration."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration (give seconds, or e.g. 10s, 5m, 1h, 7d)")
    return float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
