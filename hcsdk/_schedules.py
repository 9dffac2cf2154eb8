"""Scheduled collection: agents run a command every N seconds by themselves, and the samples
come back as a time-indexed DataFrame.

>>> gc = client.schedule("java.gc", every="10s", targets="label:app=billing", args={"main_class": "Main"})
>>> df = client.series(gc.name)              # index: time; columns: uuid, hostname, status, S0, E, O, ...
>>> df.pivot_table(index=df.index, columns="hostname", values="O").plot()
>>> client.schedules()                        # what is scheduled, with sample counts
>>> gc.cancel()

The agent keeps the schedule (it survives restarts) and spools the samples, so a brief
disconnect loses none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hcsdk._sync import SyncFace, blocking
from hcsdk._targets import TargetsLike, target_spec
from hcsdk.common.duration import seconds as duration_seconds
from hcsdk.common.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._link import MasterLink

__all__ = ["SCHEDULE_COLUMNS", "SERIES_COLUMNS", "AsyncSchedule", "Schedule", "every_seconds"]

SERIES_COLUMNS = ["uuid", "hostname", "status", "error"]
SCHEDULE_COLUMNS = ["name", "cmd", "every", "timeout", "args", "targets", "created_at", "samples", "last_sample"]


def every_seconds(every: str | float) -> float:
    """``"10s"``, ``"5m"``, ``"1h"``, ``"1d"`` or a number of seconds; at least one second."""
    try:
        seconds = duration_seconds(every)
    except ValueError:
        raise UsageError(f"every={every!r}: give a period like '10s', '5m', '1h' or a number of seconds") from None
    if seconds < 1:
        raise UsageError(f"every={every!r} is under a second; schedules run at most once a second")
    return seconds


async def create(link: MasterLink, cmd: str, every: str | float, targets: TargetsLike,
                 args: dict[str, Any] | None, name: str | None, timeout: float | None) -> dict[str, Any]:
    seconds = every_seconds(every)
    name = name or f"{cmd}-{every if isinstance(every, str) else f'{seconds:g}s'}".replace(" ", "")
    body = {"name": name, "cmd": cmd, "args": dict(args or {}), "every": seconds, "timeout": timeout or 0,
            "targets": target_spec(targets)}
    return dict(await link.request("POST", "/api/v1/schedules", json=body))


async def series(link: MasterLink, name: str, since: Any = None, until: Any = None) -> pd.DataFrame:
    import pandas as pd

    params = {k: _epoch(v) for k, v in (("since", since), ("until", until)) if v is not None}
    rows = await link.request("GET", f"/api/v1/series/{name}", params=params)
    if not rows:
        df = pd.DataFrame(columns=SERIES_COLUMNS, index=pd.DatetimeIndex([], tz="UTC", name="time"))
        return df
    base = pd.DataFrame.from_records([{k: r[k] for k in ("uuid", "hostname", "time", "status", "error")}
                                      for r in rows])
    fields = pd.json_normalize([r["fields"] for r in rows])
    df = pd.concat([base, fields.drop(columns=[c for c in fields.columns if c in base.columns])], axis=1)
    df["time"] = pd.to_datetime(df["time"], unit="s", utc=True)
    return df.set_index("time")


async def listing(link: MasterLink) -> pd.DataFrame:
    import pandas as pd

    rows = await link.request("GET", "/api/v1/schedules")
    df = pd.DataFrame.from_records(rows, columns=SCHEDULE_COLUMNS)
    for col in ("created_at", "last_sample"):
        df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    return df


async def cancel(link: MasterLink, name: str) -> dict[str, Any]:
    return dict(await link.request("DELETE", f"/api/v1/schedules/{name}"))


def _epoch(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    import pandas as pd

    return float(pd.Timestamp(value).timestamp())


class AsyncSchedule:
    """What :meth:`AsyncClient.schedule` returns: the schedule's name, and ways to its data."""

    def __init__(self, link: MasterLink, info: dict[str, Any]) -> None:
        from hcsdk._run import AsyncRun

        self._link = link
        self.name: str = info["schedule"]["name"]
        self.cmd: str = info["schedule"]["cmd"]
        self.every: float = info["schedule"]["every"]
        #: the run that set the schedule on each agent (None when its targets match no agent yet:
        #: agents that join later with matching labels get it at their handshake)
        self.run = AsyncRun(link, info["run"]) if info.get("run") else None

    def __repr__(self) -> str:
        return (f"<Schedule {self.name!r}: {self.cmd} every {self.every:g}s on "
                f"{self.run.total if self.run else 0} agents>")

    async def agents(self) -> pd.DataFrame:
        """Whether each agent took the schedule (status ok, or error with the reason)."""
        import pandas as pd

        if self.run is None:
            return pd.DataFrame(columns=["uuid", "hostname", "status", "error"])
        df = await self.run.to_dataframe()
        return df[["uuid", "hostname", "status", "error"]]

    async def series(self, since: Any = None, until: Any = None) -> pd.DataFrame:
        """This schedule's samples (see :meth:`AsyncClient.series`)."""
        return await series(self._link, self.name, since, until)

    async def cancel(self) -> dict[str, Any]:
        """Stop the schedule on its agents (the samples collected so far stay)."""
        return await cancel(self._link, self.name)


class Schedule(SyncFace[AsyncSchedule]):
    """The synchronous face of :class:`AsyncSchedule` (what :meth:`Client.schedule` returns)."""

    def __init__(self, aschedule: AsyncSchedule) -> None:
        super().__init__(aschedule)
        self.name, self.cmd, self.every = aschedule.name, aschedule.cmd, aschedule.every

    agents = blocking(AsyncSchedule.agents)
    series = blocking(AsyncSchedule.series)
    cancel = blocking(AsyncSchedule.cancel)
