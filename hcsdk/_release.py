"""Sharded rollouts of an artifact (``client.release``).

>>> rel = client.release("app.tgz", "label:role=web", dest="/opt/app/pkg.tgz", batch="20%",
...                      pre="systemctl stop app", post="systemctl start app",
...                      health="curl -fsS localhost:8080/health", max_failures=1, pause_between="30s")
>>> rel.progress()          # per target: shard, phase, status, bytes, source mix, durations
>>> rel.wait()              # until done, paused, aborted or rolled back
>>> rel.resume(); rel.abort(); rel.rollback()

The master drives the release and keeps its state: it survives a master restart and carries on
where it was; the SDK only watches.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from hcsdk._portal import portal
from hcsdk._schedules import every_seconds
from hcsdk._targets import TargetsLike, target_spec
from hcsdk.common.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._client import AsyncClient

__all__ = ["FINISHED", "PROGRESS_COLUMNS", "AsyncRelease", "Release"]

PROGRESS_COLUMNS = ["uuid", "hostname", "shard", "phase", "status", "error", "bytes", "bytes_upstream",
                    "bytes_peers", "reused", "fetch_s", "started_at", "finished_at", "duration_s"]
#: states a release stays in until an operator acts
FINISHED = ("done", "paused", "aborted", "rolled_back", "failed")


def _duration(value: str | float | None) -> float:
    if value in (None, 0, "0", "0s"):
        return 0.0
    assert value is not None
    return every_seconds(value)


async def create(client: AsyncClient, artifact: str, targets: TargetsLike, dest: str, **options: Any) -> AsyncRelease:
    if not dest.startswith("/"):
        raise UsageError(f"dest={dest!r} must be an absolute path on the targets")
    options["pause_between"] = _duration(options.get("pause_between"))
    body = {"artifact": artifact, "targets": target_spec(targets), "dest": dest,
            **{k: v for k, v in options.items() if v is not None}}
    info = await client._request("POST", "/api/v1/releases", json=body)
    return AsyncRelease(client, info)


class AsyncRelease:
    def __init__(self, client: AsyncClient, info: dict[str, Any]) -> None:
        self._client = client
        self.id: str = info["id"]
        self.info = info

    def __repr__(self) -> str:
        done = sum(t["status"] == "ok" for t in self.info["targets"])
        return (f"<Release {self.id} {self.info['name']} -> {self.info['dest']}: {self.info['state']}, "
                f"shard {min(self.info['shard'] + 1, self.info['shards'])}/{self.info['shards']}, "
                f"{done}/{len(self.info['targets'])} ok>")

    @property
    def state(self) -> str:
        return str(self.info["state"])

    async def refresh(self) -> dict[str, Any]:
        self.info = dict(await self._client._request("GET", f"/api/v1/releases/{self.id}"))
        return self.info

    async def progress(self) -> pd.DataFrame:
        import pandas as pd

        info = await self.refresh()
        df = pd.DataFrame.from_records(info["targets"], columns=PROGRESS_COLUMNS)
        df["duration_s"] = df["finished_at"] - df["started_at"]
        for col in ("started_at", "finished_at"):
            df[col] = pd.to_datetime(df[col], unit="s", utc=True)
        return df

    async def wait(self, timeout: float | None = None, poll: float = 0.5) -> AsyncRelease:
        """Until the release is done, or waits for an operator (paused), or ended otherwise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (await self.refresh())["state"] not in FINISHED:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"release {self.id} is still {self.state} after {timeout:g}s")
            await anyio.sleep(poll)
        return self

    async def _act(self, action: str) -> AsyncRelease:
        self.info = dict(await self._client._request("POST", f"/api/v1/releases/{self.id}/{action}"))
        return self

    async def pause(self) -> AsyncRelease:
        return await self._act("pause")

    async def resume(self) -> AsyncRelease:
        return await self._act("resume")

    async def abort(self) -> AsyncRelease:
        return await self._act("abort")

    async def rollback(self) -> AsyncRelease:
        """Put the previous file back on every target the release reached, then run its
        ``rollback`` command there."""
        return await self._act("rollback")


class Release:
    """The synchronous face of :class:`AsyncRelease`."""

    def __init__(self, arelease: AsyncRelease) -> None:
        self._a = arelease
        self.id = arelease.id

    def __repr__(self) -> str:
        return repr(self._a).replace("<Release", "<Release", 1)

    @property
    def state(self) -> str:
        return self._a.state

    @property
    def info(self) -> dict[str, Any]:
        return self._a.info

    def refresh(self) -> dict[str, Any]:
        return portal().call(self._a.refresh)

    def progress(self) -> pd.DataFrame:
        return portal().call(self._a.progress)

    def wait(self, timeout: float | None = None) -> Release:
        portal().call(self._a.wait, timeout)
        return self

    def pause(self) -> Release:
        portal().call(self._a.pause)
        return self

    def resume(self) -> Release:
        portal().call(self._a.resume)
        return self

    def abort(self) -> Release:
        portal().call(self._a.abort)
        return self

    def rollback(self) -> Release:
        portal().call(self._a.rollback)
        return self
