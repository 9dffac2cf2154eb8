"""What the master sends an agent to set a schedule, with the digest that lets the two compare
notes at each handshake (see ``master.schedules.Schedules.reconcile``)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from hcsdk.protocol.wire import dumps

#: what a schedule (and so its series) may be called: the API's rule, and a handshake's
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
_NAME_RE = re.compile(NAME_PATTERN)
#: the most schedules a handshake may report: each one the master does not want costs a cancel
MAX_REPORTED = 256


def schedule_args(name: str, cmd: str, args: dict[str, Any], every: float, timeout: float) -> dict[str, Any]:
    spec = {"cmd": cmd, "args": args, "every": float(every), "timeout": float(timeout)}
    digest = hashlib.sha256(dumps(spec)).hexdigest()[:16]
    return {"name": name, **spec, "digest": digest}


def reported_problem(reported: Any) -> str | None:
    """Why a handshake's ``schedules`` (name -> digest, what the agent runs) cannot be taken, or
    None. Every name once came from the master, which checked it; anything else is not an
    honest agent's, and must not make the master do work per name."""
    if not isinstance(reported, dict):
        return "'schedules' must map schedule names to digests"
    if len(reported) > MAX_REPORTED:
        return f"'schedules' names {len(reported)} schedules; an agent runs at most {MAX_REPORTED}"
    for name, digest in reported.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            return f"'schedules' holds {str(name)[:80]!r}, which is no schedule name ({NAME_PATTERN})"
        if not isinstance(digest, str) or len(digest) > 64:
            return f"'schedules' gives schedule {name!r} a digest that is not a short string"
    return None
