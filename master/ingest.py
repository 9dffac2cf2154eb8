"""Results from the agents into the store: the uplink handlers put checked, authentic messages
(start/out/done/sample) on one queue; a single writer drains whatever is ready, stores it in one
transaction, then acknowledges to each agent and wakes the SDK streams of the runs that changed.
Batching is what keeps SQLite and Python off the hot path.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from hcsdk.protocol.messages import Ack, Sample

from .run_events import RunEvents
from .sessions import Session, Sessions
from .store import Result, StoreThread

__all__ = ["Ingest"]

log = logging.getLogger("zy.master.hub")

#: the most messages stored in one transaction
_BATCH = 5000


class Ingest:
    def __init__(self, db: StoreThread, table: Sessions, events: RunEvents, stats: dict[str, int]) -> None:
        self.db = db
        self.table = table
        self.events = events
        self.stats = stats
        self._tx, self._rx = anyio.create_memory_object_stream[tuple[str, Result]](20_000)

    async def put(self, uuid: str, msg: Result) -> None:
        """Queue one checked, authentic message of agent ``uuid`` (waits while the writer is
        20,000 behind)."""
        await self._tx.send((uuid, msg))

    def close(self) -> None:
        """Close the queue (the master never does: it ends with its process; a test does)."""
        self._tx.close()
        self._rx.close()

    def ack(self, uuid: str, ids: list[list[Any]]) -> dict[str, Any]:
        """The signed acknowledgement of ``ids`` ([taskid, seq] pairs) for agent ``uuid``."""
        return Ack(uuid=uuid, ids=ids).signed_wire(self.table.key(uuid))

    def refuse_sample(self, session: Session, uuid: str, msg: Sample) -> None:
        """Not stored, counted, and acknowledged: the agent stops resending what will never be
        taken (as the store does for results of tasks that are not the sender's)."""
        self.stats["rejected"] += 1
        log.warning("rejected a sample from %s for series %r: the master never gave it that schedule",
                    uuid, msg.series)
        session.send([self.ack(uuid, [[msg.taskid, msg.seq]])])

    async def run(self) -> None:
        """The single writer, for as long as the master runs."""
        async for first in self._rx:
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._rx.receive_nowait())
                except anyio.WouldBlock:
                    break
            await self._store(batch)

    async def _store(self, batch: list[tuple[str, Result]]) -> None:
        try:
            acks, changed = await self.db(self.db.store.ingest, batch)
        except Exception:
            # e.g. a full disk: nothing is acknowledged, and the senders' channels are closed
            # so that they reconnect and resend everything still in their spools
            log.exception("could not store %d agent messages; their agents will resend", len(batch))
            for uuid in {u for u, _ in batch}:
                session = self.table.sessions.get(uuid)
                if session:
                    session.close("results could not be stored")
                    self.table.session_ended(session)
            return
        self.stats["ingested"] += len(batch)
        sessions = self.table.sessions
        for uuid, pairs in acks.items():
            session = sessions.get(uuid)
            if session:
                session.send([self.ack(uuid, pairs)])
        self.events.notify(changed)
