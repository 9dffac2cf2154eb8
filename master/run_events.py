"""Wake-ups for the SDK's event streams: whoever changes a run (dispatch, ingest, the sweep)
notifies its id; a stream waiting on that run then reads the store again.

With several masters (issue 15) the stream may be on another master than the change: ``notify``
also queues the ids for the cluster, which sends them on the ``zy_runs`` wake-up channel
(``take_published``); a wake-up from another master only ``wake``s the local waiters. Wake-ups
may be lost, so the cluster also ``wake_all``s about once a second and every stream re-reads.

``stream`` is the SDK's event stream itself (``GET /api/v1/runs/{id}/events``): it outlasts a
store that goes away for a while (PostgreSQL restarted or failing over) by trying again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from hcsdk.protocol.wire import dumps, loads

from .store import Store, StoreThread

__all__ = ["STORE_PATIENCE", "RunEvents"]

log = logging.getLogger("zy.master.hub")

#: how long an event stream waits for a store that fails its reads before it gives up (the
#: SDK then resumes by cursor, here or on another master)
STORE_PATIENCE = 60.0


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

    async def stream(self, db: StoreThread, run_id: str, cursor: int, folded: bool = False) -> AsyncIterator[bytes]:
        """NDJSON lines of ``run_id``'s events past ``cursor``, then ``{"kind": "end"}`` once no
        task is open; blank lines keep idle middleboxes from cutting the connection. ``folded``:
        a done keeps the output an agent folded into it (the SDK's way: one line per short task);
        otherwise that output comes first as out lines, as an older agent sent it."""
        store = db.store
        failing_since: float | None = None
        while True:
            changed = self.changed(run_id)
            try:
                # Count open tasks before reading events: a task's final event commits together
                # with its status, so "no open task" seen first means every event is readable.
                still_open, rows = await db(_page, store, run_id, cursor)
            except Exception:
                # the store is away (a PostgreSQL restart cuts every pooled connection): keep the
                # SDK's stream, and read again shortly
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("run %s: the store failed a read of its events; trying again", run_id, exc_info=True)
                elif now - failing_since > STORE_PATIENCE:
                    raise
                yield b"\n"
                await anyio.sleep(0.5)
                continue
            failing_since = None
            if rows:
                cursor = rows[-1]["id"]
                yield b"".join([_folded_line(r) for r in rows] if folded else [_unfolded_lines(r) for r in rows])
                continue
            if still_open == 0:
                self.forget(run_id)
                yield dumps({"kind": "end", "id": cursor}) + b"\n"
                return
            with anyio.move_on_after(10):
                await changed.wait()
                continue
            yield b"\n"  # keep-alive through idle middleboxes


def _folded_line(row: dict[str, Any]) -> bytes:
    """One stored event as one line, its data (JSON as stored) spliced in, not parsed again."""
    data = row.pop("data")
    head = dumps(row)
    return head[:-1] + b',"data":' + (data.encode() if isinstance(data, str) else dumps(data)) + b"}\n"


def _unfolded_lines(row: dict[str, Any]) -> bytes:
    """One stored event as lines a reader of start/out/done understands: a done's folded output
    as the out lines it stands for (numbered just before it, under the done's id)."""
    data = row["data"] = loads(row["data"])
    folded = data.pop("out", None) if row["kind"] == "done" and isinstance(data, dict) else None
    if not folded:
        return dumps(row) + b"\n"
    first = row["seq"] - len(folded)
    outs = [dumps({**row, "seq": first + i, "kind": "out", "data": {"stream": stream, "data": text}})
            for i, (stream, text) in enumerate(folded)]
    return b"\n".join([*outs, dumps(row)]) + b"\n"


def _page(store: Store, run_id: str, cursor: int) -> tuple[int, list[dict[str, Any]]]:
    """Open tasks, then the events past ``cursor``: one trip to the store thread, not two."""
    return store.run_open_count(run_id), store.events_after(run_id, cursor)
