"""Writing the agent's small state files (plugin index, schedules, build pointer, journals) so a
crash or power cut leaves the old file or the new one, never half of either."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hcsdk.common.files import atomic_write


def write_json(path: Path, data: Any) -> None:
    """The JSON of ``data`` replaces ``path`` through a fresh temp file beside it (O_EXCL: no
    planted symlink is followed), fsynced, then renamed over it."""
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True), prefix=f".{path.name}.", suffix="")
