"""Wake-ups for the SDK's event streams: whoever changes a run (dispatch, ingest, the sweep)
notifies its id; a stream waiting on that run then reads the store again."""

from __future__ import annotations

import anyio

__all__ = ["RunEvents"]


class RunEvents:
    def __init__(self) -> None:
        self._events: dict[str, anyio.Event] = {}

    def notify(self, run_ids: set[str]) -> None:
        for run_id in run_ids:
            ev = self._events.pop(run_id, None)
            if ev:
                ev.set()

    def changed(self, run_id: str) -> anyio.Event:
        """Set at the next change of ``run_id``."""
        return self._events.setdefault(run_id, anyio.Event())

    def forget(self, run_id: str) -> None:
        """A stream that stops waiting (its run is over) drops its unfired event."""
        ev = self._events.get(run_id)
        if ev is not None and not ev.is_set():
            del self._events[run_id]
