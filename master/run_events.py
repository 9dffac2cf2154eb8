"""Wake-ups for the SDK's event streams: whoever changes a run (dispatch, ingest, the sweep)
notifies its id; a stream waiting on that run then reads the store again.

With several masters (issue 15) the stream may be on another master than the change: ``notify``
also queues the ids for the cluster, which sends them on the ``zy_runs`` wake-up channel
(``take_published``); a wake-up from another master only ``wake``s the local waiters. Wake-ups
may be lost, so the cluster also ``wake_all``s about once a second and every stream re-reads.
"""

from __future__ import annotations

import anyio

__all__ = ["RunEvents"]


class RunEvents:
    def __init__(self) -> None:
        self._events: dict[str, anyio.Event] = {}
        #: set by the cluster: changed run ids are also queued for the other masters
        self.publish = False
        self._outbox: set[str] = set()
        self._ready = anyio.Event()

    def notify(self, run_ids: set[str]) -> None:
        """``run_ids`` changed here: wake this master's waiters, and the others' (with ``publish``)."""
        self.wake(run_ids)
        if self.publish and run_ids:
            self._outbox |= run_ids
            self._ready.set()

    def wake(self, run_ids: set[str] | list[str]) -> None:
        """Wake the local waiters of ``run_ids`` (nothing is sent on)."""
        for run_id in run_ids:
            ev = self._events.pop(run_id, None)
            if ev:
                ev.set()

    def wake_all(self) -> None:
        """Every local waiter reads the store again (the fallback for lost wake-ups)."""
        events, self._events = self._events, {}
        for ev in events.values():
            ev.set()

    async def take_published(self) -> set[str]:
        """The run ids notified since the previous call (waits for at least one)."""
        while not self._outbox:
            await self._ready.wait()
            self._ready = anyio.Event()
        out, self._outbox = self._outbox, set()
        return out

    def changed(self, run_id: str) -> anyio.Event:
        """Set at the next change of ``run_id``."""
        return self._events.setdefault(run_id, anyio.Event())

    def forget(self, run_id: str) -> None:
        """A stream that stops waiting (its run is over) drops its unfired event."""
        ev = self._events.get(run_id)
        if ev is not None and not ev.is_set():
            del self._events[run_id]
