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

from hcsdk._schedules import every_seconds
from hcsdk._sync import SyncFace, blocking, blocking_self
from hcsdk._targets import TargetsLike, target_spec
from hcsdk.common.errors import UsageError
from hcsdk.protocol.releases import FINISHED, TargetStatus  # FINISHED: states a release stays in until an operator acts

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._link import MasterLink

__all__ = ["FINISHED", "PROGRESS_COLUMNS", "AsyncRelease", "Release"]

PROGRESS_COLUMNS = ["uuid", "hostname", "shard", "phase", "status", "error", "bytes", "bytes_upstream",
                    "bytes_peers", "reused", "fetch_s", "started_at", "finished_at", "duration_s"]


def _duration(value: str | float | None) -> float:
    if value in (None, 0, "0", "0s"):
        return 0.0
    assert value is not None
    return every_seconds(value)


async def create_release(link: MasterLink, artifact: str, targets: TargetsLike, dest: str,
                         **options: Any) -> AsyncRelease:
    if not dest.startswith("/"):
        raise UsageError(f"dest={dest!r} must be an absolute path on the targets")
    options["pause_between"] = _duration(options.get("pause_between"))
    body = {"artifact": artifact, "targets": target_spec(targets), "dest": dest,
            **{k: v for k, v in options.items() if v is not None}}
    info = await link.request("POST", "/api/v1/releases", json=body)
    return AsyncRelease(link, info)


class AsyncRelease:
    """A release on the master: its state (``info``, kept fresh by :meth:`refresh`) and the
    operator's actions."""

    def __init__(self, link: MasterLink, info: dict[str, Any]) -> None:
        self._link = link
        self.id: str = info["id"]
        self.info = info

    def __repr__(self) -> str:
        done = sum(t["status"] == TargetStatus.OK for t in self.info["targets"])
        return (f"<Release {self.id} {self.info['name']} -> {self.info['dest']}: {self.info['state']}, "
                f"shard {min(self.info['shard'] + 1, self.info['shards'])}/{self.info['shards']}, "
                f"{done}/{len(self.info['targets'])} ok>")

    @property
    def state(self) -> str:
        return str(self.info["state"])

    async def refresh(self) -> dict[str, Any]:
        """The release as the master has it now (also kept in ``info``)."""
        self.info = dict(await self._link.request("GET", f"/api/v1/releases/{self.id}"))
        return self.info

    async def progress(self) -> pd.DataFrame:
        """Per target: shard, phase, status, bytes, source mix, durations."""
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
        self.info = dict(await self._link.request("POST", f"/api/v1/releases/{self.id}/{action}"))
        return self

    async def pause(self) -> AsyncRelease:
        """Hold the release: no further shard starts until :meth:`resume`."""
        return await self._act("pause")

    async def resume(self) -> AsyncRelease:
        """Carry on after a pause."""
        return await self._act("resume")

    async def abort(self) -> AsyncRelease:
        """End the release: no further shard starts (what was placed stays; see :meth:`rollback`)."""
        return await self._act("abort")

    async def rollback(self) -> AsyncRelease:
        """Put the previous file back on every target the release reached, then run its
        ``rollback`` command there."""
        return await self._act("rollback")


class Release(SyncFace[AsyncRelease]):
    """The synchronous face of :class:`AsyncRelease` (what :meth:`Client.release` returns)."""

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def state(self) -> str:
        return self._async.state

    @property
    def info(self) -> dict[str, Any]:
        return self._async.info

    refresh = blocking(AsyncRelease.refresh)
    progress = blocking(AsyncRelease.progress)
    wait = blocking_self(AsyncRelease.wait)
    pause = blocking_self(AsyncRelease.pause)
    resume = blocking_self(AsyncRelease.resume)
    abort = blocking_self(AsyncRelease.abort)
    rollback = blocking_self(AsyncRelease.rollback)
