"""Agents in place: online self-update in batches (``client.agents.update``).

>>> df = client.agents.update("label:role=web", build="dist/zy-agent", batch_size=10, max_failures=1)
>>> df[["hostname", "batch", "status", "version_before", "version_after", "error"]]

Each agent fetches the build (by the SHA-256 in the master's signed command), starts it, and
hands over to it without dropping a task; see ``agent/update.py`` for the seven steps. Batches
go one after the other; once more than ``max_failures`` agents failed, the rest are ``skipped``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from hcsdk._sync import SyncFace, blocking
from hcsdk._targets import TargetsLike, target_spec
from hcsdk.common.errors import TargetError, UsageError
from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.vocab import UPDATE

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._client import AsyncClient
    from hcsdk._link import MasterLink

__all__ = ["UPDATE_COLUMNS", "Agents", "AsyncAgents"]

UPDATE_COLUMNS = ["uuid", "hostname", "batch", "status", "version_before", "version_after", "error",
                  "duration_s"]
Progress = Callable[[dict[str, Any]], None]
#: the row of an agent left out once too many failed (the SDK's word: no task ran)
SKIPPED = "skipped"


class AsyncAgents:
    """Agents in place (``AsyncClient().agents``): builds on the master, online updates."""

    def __init__(self, client: AsyncClient, link: MasterLink) -> None:
        self._client = client  # its public run(): an update is a run of zy.update
        self._link = link

    async def upload_build(self, build: str | Path) -> dict[str, Any]:
        """Store a build on the master (streamed); returns its ``sha256`` and ``size``."""
        path = Path(build)
        if not await anyio.Path(path).is_file():
            raise UsageError(f"no build at {path} (make agent writes dist/zy-agent and dist/zy-agent.pyz)")

        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(path, "rb") as fh:
                while chunk := await fh.read(1024 * 1024):
                    yield chunk

        return dict(await self._link.send("/api/v1/blobs", chunks(), timeout=600.0))

    async def update(self, targets: TargetsLike, build: str | Path, *, batch_size: int = 10,
                     max_failures: int = 0, timeout: float = 600, handover_timeout: float = 60,
                     progress: Progress | None = None) -> pd.DataFrame:
        """Update ``targets`` to ``build`` (a one-file build or a zipapp), ``batch_size`` agents
        at a time; stop before the next batch once more than ``max_failures`` have failed.
        One row per agent: its batch, status (ok, failed, error, offline, timeout, skipped),
        version before and after, and the reason when it did not update."""
        import pandas as pd

        if batch_size < 1 or max_failures < 0:
            raise UsageError("batch_size must be at least 1 and max_failures at least 0")
        agents = await self._targets(targets)
        blob = await self.upload_build(build)
        args = {"sha256": blob["sha256"], "size": blob["size"], "filename": Path(build).name,
                "handover_timeout": handover_timeout}
        rows: list[dict[str, Any]] = []
        failures = 0
        for number, start in enumerate(range(0, len(agents), batch_size), 1):
            batch = agents[start:start + batch_size]
            if failures > max_failures:
                rows += [_row(a, number, SKIPPED, error=f"stopped after {failures} failures "
                              f"(max_failures={max_failures})") for a in batch]
                continue
            done = await self._batch(batch, number, args, timeout)
            failures += sum(r["status"] != TaskStatus.OK for r in done)
            rows += done
            if progress is not None:
                progress({"batch": number, "done": len(rows), "total": len(agents), "failures": failures})
        return pd.DataFrame.from_records(rows, columns=UPDATE_COLUMNS)

    async def _batch(self, batch: list[dict[str, Any]], number: int, args: dict[str, Any],
                     timeout: float) -> list[dict[str, Any]]:
        started = time.monotonic()
        run = await self._client.run(cmd=UPDATE, args=args, targets=[a["uuid"] for a in batch],
                                     timeout=timeout)
        await run.wait()
        after = {r["uuid"]: r for r in await self._inventory()}
        out = []
        for agent in batch:
            row = next(r for r in run.outcomes() if r.uuid == agent["uuid"])
            now = after.get(agent["uuid"], {})
            out.append(_row(agent, number, row.status or TaskStatus.ERROR.value, error=row.error,
                            version_after=(now.get("facts") or {}).get("agent_version"),
                            duration=time.monotonic() - started))
        return out

    async def _inventory(self) -> list[dict[str, Any]]:
        return list(await self._link.request("GET", "/api/v1/inventory"))

    async def _targets(self, targets: TargetsLike) -> list[dict[str, Any]]:
        """The agents ``targets`` names, resolved by the master as a run would."""
        spec = target_spec(targets)
        rows = await self._inventory()
        if "uuids" in spec:
            wanted = set(spec["uuids"])
            chosen = [r for r in rows if r["uuid"] in wanted or r["hostname"] in wanted]
        else:
            params = {"targets": spec.get("expr", "")}
            chosen = list(await self._link.request("GET", "/api/v1/inventory", params=params))
        agents = [r for r in chosen if r.get("kind", "agent") == "agent"]
        if not agents:
            raise TargetError(f"no agents match {targets!r}")
        return agents


def _row(agent: dict[str, Any], batch: int, status: str, error: str | None = None,
         version_after: str | None = None, duration: float | None = None) -> dict[str, Any]:
    return {"uuid": agent["uuid"], "hostname": agent["hostname"], "batch": batch, "status": status,
            "version_before": (agent.get("facts") or {}).get("agent_version"), "version_after": version_after,
            "error": error, "duration_s": duration}


class Agents(SyncFace[AsyncAgents]):
    """The synchronous face of :class:`AsyncAgents` (``Client().agents``)."""

    upload_build = blocking(AsyncAgents.upload_build)
    update = blocking(AsyncAgents.update)
