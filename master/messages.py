"""Checks on what agents send, beyond framing: a message that passes here can be stored
without surprises. Anything else is treated like a garbage frame."""

from __future__ import annotations

import math
from typing import Any

from .store import FINAL

_MAX_SEQ = 2**31 - 1
_MAX_INT = 2**63 - 1


def _num(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e13)


def problem(msg: dict[str, Any]) -> str | None:
    """Why an uplink message is malformed, or None when it is fine."""
    kind = msg["t"]
    if kind in ("hb", "bye"):
        return None if isinstance(msg.get("uuid"), str) else "uuid must be a string"
    if kind == "stats":
        return _stats_problem(msg)
    taskid, seq, p = msg.get("taskid"), msg.get("seq"), msg.get("p")
    if not isinstance(taskid, str) or not 0 < len(taskid) <= 128:
        return "taskid must be a string of 1-128 characters"
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= _MAX_SEQ:
        return f"seq must be an integer from 0 to {_MAX_SEQ}"
    if not isinstance(p, dict):
        return "payload must be an object"
    if kind == "start":
        return None if _num(p.get("started_at")) else "start needs a numeric started_at"
    if kind == "sample":
        return _sample_problem(p)
    if kind == "out":
        if p.get("stream") not in ("stdout", "stderr") or not isinstance(p.get("data"), str):
            return "out needs stream stdout|stderr and string data"
        return None
    return _done_problem(p)


def _done_problem(p: dict[str, Any]) -> str | None:
    if p.get("status") not in FINAL:
        return f"done needs a status among {', '.join(FINAL)}"
    code = p.get("exit_code")
    if code is not None and (not isinstance(code, int) or isinstance(code, bool) or abs(code) > _MAX_INT):
        return "exit_code must be an integer or null"
    if not (_num(p.get("started_at")) and _num(p.get("finished_at"))):
        return "started_at and finished_at must be numbers or null"
    if p.get("error") is not None and not isinstance(p.get("error"), str):
        return "error must be a string or null"
    truncated = p.get("truncated", {})
    if not isinstance(truncated, dict) or not all(isinstance(v, bool) for v in truncated.values()):
        return "truncated must map stream names to booleans"
    return None


def _sample_problem(p: dict[str, Any]) -> str | None:
    if not isinstance(p.get("series"), str) or not 0 < len(p["series"]) <= 64:
        return "sample needs a series name of 1-64 characters"
    if not (_num(p.get("time")) and p.get("time") is not None):
        return "sample needs a numeric time"
    if p.get("status") not in FINAL:
        return f"sample needs a status among {', '.join(FINAL)}"
    if not isinstance(p.get("fields"), dict):
        return "sample fields must be an object"
    if p.get("error") is not None and not isinstance(p.get("error"), str):
        return "error must be a string or null"
    return None


def _stats_problem(msg: dict[str, Any]) -> str | None:
    """A proxy's counters: ``p.cache``, an object of at most 64 numbers under short names."""
    if not isinstance(msg.get("uuid"), str):
        return "uuid must be a string"
    p = msg.get("p")
    cache = p.get("cache") if isinstance(p, dict) else None
    if not isinstance(cache, dict) or len(cache) > 64:
        return "stats needs p.cache, an object of at most 64 counters"
    for key, value in cache.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            return "stats counter names must be strings of 1-64 characters"
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or abs(value) > _MAX_INT):
            return f"stats counter {key!r} must be a finite number"
    return None
