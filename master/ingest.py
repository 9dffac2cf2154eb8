"""Results from the agents into the store: the uplink handlers put checked, authentic messages
(start/out/done/sample) on one queue; a single writer drains whatever is ready, stores it in one
transaction, then acknowledges to each agent and wakes the SDK streams of the runs that changed.
Batching is what keeps SQLite and Python off the hot path.
"""

from __future__ import annotations

import logging
from functools import partial
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
#: how long an acknowledgement may wait for a write to its agent to ride with (the next task,
#: a heartbeat): a fan-out's acks mostly go with the next run's tasks, one write per agent and
#: round instead of two, and an agent's acks of several batches are one message. An agent keeps
#: its results this much longer; nothing stored is lost by the wait.
ACK_DELAY = 0.5


class Ingest:
    def __init__(self, db: StoreThread, table: Sessions, events: RunEvents, stats: dict[str, int]) -> None:
        self.db = db
        self.table = table
        self.events = events
        self.stats = stats
        self._tx, self._rx = anyio.create_memory_object_stream[tuple[str, Result]](20_000)
        #: sessions holding acknowledgements (see ACK_DELAY), and the flusher's wake-up
        self._acking: dict[str, Session] = {}
        self._acks_held = anyio.Event()

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
        """The single writer (and its acknowledgements' flusher), for as long as the master runs."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._flush_acks)
            await self._write()
            tg.cancel_scope.cancel()

    async def _flush_acks(self) -> None:
        """Send, ACK_DELAY after they were held, the acknowledgements no write took meanwhile."""
        while True:
            await self._acks_held.wait()
            self._acks_held = anyio.Event()
            await anyio.sleep(ACK_DELAY)
            due, self._acking = self._acking, {}
            for session in due.values():
                session.flush_acks()

    async def _write(self) -> None:
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
            if session and session.defer_ack(pairs, partial(self.ack, uuid)):
                self._acking[uuid] = session
        if self._acking:
            self._acks_held.set()
        self.events.notify(changed)
