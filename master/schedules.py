"""Schedules on the agents, as the master sees them: the specs (cached for handshakes), which
schedules the master ever gave each agent (what it may sample into), and the reconciliation
at each handshake that sets or cancels what the agent runs so it matches the master.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hcsdk.protocol import vocab
from hcsdk.protocol.messages import Sample

from .schedule_spec import schedule_args
from .store import StoreThread
from .targets import selects

__all__ = ["CreateRun", "Schedules"]

log = logging.getLogger("zy.master.hub")

#: how a run is made: (cmd, args, targets, timeout) -> the run
CreateRun = Callable[[str, dict[str, Any], Any, float], Awaitable[dict[str, Any]]]

#: with several masters, how long the cached specs serve handshakes before they are read again
_SHARED_TTL = 5.0


class Schedules:
    def __init__(self, db: StoreThread, create_run: CreateRun) -> None:
        self.db = db
        self.create_run = create_run
        #: the schedules, cached for handshakes; None when they must be read again
        self.specs: list[dict[str, Any]] | None = None
        #: uuid -> names of the schedules the master ever sent it (read from the store once per
        #: agent, kept up to date as schedules are set): what it may sample into and report
        self._given: dict[str, set[str]] = {}
        self._given_loaded: set[str] = set()
        #: several masters share the store (issue 15): another master may set a schedule on an
        #: agent held here, so the caches are read again (specs at most every few seconds, an
        #: agent's schedules when it samples into one this master has not seen it given)
        self.shared = False
        self._specs_read = 0.0
        self._given_read: dict[str, float] = {}

    def worth_reconciling(self, reported: dict[str, str]) -> bool:
        # (a reconnect storm of agents with no schedules, on a master with none, costs nothing)
        return bool(reported) or self.specs != []

    async def reconcile(self, uuid: str, reported: dict[str, str]) -> None:
        """Bring an agent's schedules (``reported``: name -> digest) in line with the master's:
        one that was offline when a schedule was set, or that joined later with matching labels,
        gets it; one whose schedule was cancelled meanwhile loses it."""
        try:
            if self.specs is None or (self.shared and time.monotonic() - self._specs_read > _SHARED_TTL):
                self._specs_read = time.monotonic()
                self.specs = await self.db(self.db.store.schedule_specs)
            specs = self.specs
            if not specs and not reported:
                return
            agent = await self.db(self.db.store.target_row, uuid)
            wanted = {s["name"]: s for s in specs if agent is not None and selects(s["targets"], agent)}
            for name, spec in wanted.items():
                args = schedule_args(name, spec["cmd"], spec["args"], spec["every"], spec["timeout"])
                if reported.get(name) != args["digest"]:
                    await self.create_run(vocab.SCHEDULE_SET, args, {"uuids": [uuid]}, 60.0)
            # only what the master once gave this agent: a handshake naming others (invented,
            # or another agent's) makes no cancel run
            given = await self.given(uuid)
            for name in sorted((set(reported) - set(wanted)) & given):
                await self.create_run(vocab.SCHEDULE_CANCEL, {"name": name}, {"uuids": [uuid]}, 60.0)
        except Exception:  # the next handshake tries again
            log.exception("could not reconcile the schedules of %s", uuid)

    def gave(self, name: str, uuids: list[str]) -> None:
        """A ``zy.schedule.set`` run for schedule ``name`` went to ``uuids``."""
        for uuid in uuids:
            self._given.setdefault(uuid, set()).add(name)

    async def given(self, uuid: str) -> set[str]:
        """Names of the schedules the master ever sent agent ``uuid``."""
        if uuid not in self._given_loaded:
            loaded = await self.db(self.db.store.schedules_given, uuid)
            # a union, not an assignment: a schedule set while the store was being read is kept
            self._given.setdefault(uuid, set()).update(loaded)
            self._given_loaded.add(uuid)
        return self._given[uuid]

    async def may_sample(self, uuid: str, msg: Sample) -> bool:
        """Whether a sample from ``uuid`` belongs to a schedule the master gave it: any other is
        an agent writing into a series that is not its own."""
        series = msg.series
        if not msg.taskid.startswith(f"sample:{series}:"):
            return False
        given = await self.given(uuid)
        if series not in given and self.shared and time.monotonic() - self._given_read.get(uuid, 0.0) > 1.0:
            # set by another master since this one read it (at most once a second per agent)
            self._given_read[uuid] = time.monotonic()
            given.update(await self.db(self.db.store.schedules_given, uuid))
        return series in given
