"""What the master sends an agent to set a schedule, with the digest that lets the two compare
notes at each handshake (see ``Hub.reconcile_schedules``)."""

from __future__ import annotations

import hashlib
from typing import Any

from hcsdk._wire import dumps


def schedule_args(name: str, cmd: str, args: dict[str, Any], every: float, timeout: float) -> dict[str, Any]:
    spec = {"cmd": cmd, "args": args, "every": float(every), "timeout": float(timeout)}
    digest = hashlib.sha256(dumps(spec)).hexdigest()[:16]
    return {"name": name, **spec, "digest": digest}
