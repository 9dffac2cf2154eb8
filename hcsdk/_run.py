"""A run: one command fanned out to many targets, its events, and its results as a DataFrame."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from hcsdk._display import ResultView
from hcsdk._sync import SyncFace, blocking, blocking_self, iterating, local
from hcsdk.common.backoff import Backoff
from hcsdk.common.errors import MasterUnreachable, ZyError
from hcsdk.protocol.tasks import FINAL, TaskStatus
from hcsdk.protocol.wire import loads

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._link import MasterLink

__all__ = ["COLUMNS", "STATUSES", "AsyncRun", "Event", "Outcome", "Run"]

#: a target's final statuses, as the task lifecycle defines them (plain strings, as in the DataFrame)
STATUSES: tuple[str, ...] = tuple(status.value for status in FINAL)
COLUMNS = ["uuid", "hostname", "status", "exit_code", "stdout", "stderr", "started_at", "finished_at",
           "duration_s", "error", "truncated", "taskid", "result"]


@dataclass(frozen=True, kw_only=True)
class Event:
    """One thing that happened on one target.

    ``kind`` is ``start``, ``stdout``, ``stderr`` (``data`` holds the chunk, ``seq`` orders
    the chunks of one target) or ``done`` (``status`` and ``exit_code`` are final).
    """

    kind: str
    uuid: str
    hostname: str
    taskid: str
    seq: int
    data: str = ""
    status: str | None = None
    exit_code: int | None = None
    error: str | None = None
    #: what a plugin returned (on ``done``), e.g. ``{"size": 12, "sha256": "..."}``
    result: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """Where one target stands: ``status`` is None until it is final (see ``STATUSES``)."""

    uuid: str
    hostname: str
    taskid: str
    status: str | None
    exit_code: int | None
    error: str | None
    #: what a plugin returned, e.g. ``{"size": 12, "sha256": "..."}``
    result: dict[str, Any] | None


@dataclass
class _Row:
    uuid: str
    hostname: str
    taskid: str
    status: str | None = None
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    truncated: dict[str, bool] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    chunks: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: {"stdout": [], "stderr": []})

    def text(self, stream: str) -> str:
        return "".join(data for _, data in sorted(self.chunks[stream], key=lambda c: c[0]))


class AsyncRun:
    """Returned by :meth:`AsyncClient.run`. Iterate :meth:`events` to stream, or await
    :meth:`to_dataframe` for the final table."""

    def __init__(self, link: MasterLink, info: dict[str, Any], reconnect_timeout: float = 120.0):
        self._link = link
        self.id: str = info["run_id"]
        self.cmd: str = info["cmd"]
        self._rows = {t["taskid"]: _Row(t["uuid"], t["hostname"], t["taskid"]) for t in info["targets"]}
        self._cursor = 0
        self._complete = False
        self._lock = anyio.Lock()
        self._reconnect_timeout = reconnect_timeout
        self._last_ok = time.monotonic()

    def __repr__(self) -> str:
        return f"<AsyncRun {self.id} {self.cmd} targets={len(self._rows)} {self.counts()}>"

    @property
    def done(self) -> bool:
        return self._complete

    @property
    def total(self) -> int:
        return len(self._rows)

    def outcomes(self) -> list[Outcome]:
        """Each target's outcome so far, in the order the master listed the targets."""
        return [Outcome(uuid=r.uuid, hostname=r.hostname, taskid=r.taskid, status=r.status, exit_code=r.exit_code,
                        error=r.error, result=r.result) for r in self._rows.values()]

    def counts(self) -> dict[str, int]:
        """Targets per status so far; ``pending`` for those still running."""
        out: dict[str, int] = {}
        for row in self._rows.values():
            key = row.status or TaskStatus.PENDING.value
            out[key] = out.get(key, 0) + 1
        return out

    async def events(self) -> AsyncIterator[Event]:
        """Events as they arrive, resuming after a dropped connection or a master restart."""
        async with self._lock:
            backoff = Backoff(0.2, 5.0)
            self._last_ok = time.monotonic()
            while not self._complete:
                try:
                    async for event in self._stream():
                        backoff.reset()
                        yield event
                except MasterUnreachable:
                    # counted from the last sign of life, keep-alives included: a quiet command
                    # outlives a master restart as well as a chatty one
                    if time.monotonic() - self._last_ok > self._reconnect_timeout:
                        raise
                    await anyio.sleep(backoff.next_delay())

    async def _stream(self) -> AsyncIterator[Event]:
        try:
            query = {"after": self._cursor, "folded": 1}  # a done may carry its output (see _apply)
            async with self._link.lines(f"/api/v1/runs/{self.id}/events", query) as lines:
                self._last_ok = time.monotonic()
                async for line in lines:
                    self._last_ok = time.monotonic()
                    if not line.strip():
                        continue
                    rec = loads(line)
                    if rec.get("kind") == "end":
                        self._complete = True
                        return
                    self._cursor = rec["id"]
                    for event in self._apply(rec):
                        yield event
        except ZyError:
            raise
        except Exception as exc:  # transport trouble mid-stream: resume from the cursor
            raise MasterUnreachable(f"event stream broke: {exc or type(exc).__name__}") from None

    def _apply(self, rec: dict[str, Any]) -> list[Event]:
        """The events one record makes: a done first yields the start and the output folded
        into it (the pieces the agent sent with it, numbered just before it), as start and out
        records would have."""
        row = self._rows.get(rec["taskid"])
        if row is None:
            return []
        data = rec.get("data") or {}
        kind, seq = rec["kind"], rec["seq"]
        if kind == "start":
            row.started_at = data.get("started_at")
            return [Event(kind="start", uuid=row.uuid, hostname=row.hostname, taskid=row.taskid, seq=seq)]
        if kind == "out":
            return [self._out(row, seq, data.get("stream"), data.get("data", ""))]
        if kind == "done":
            folded = data.get("out") or []
            first = seq - len(folded)
            events = []
            if row.started_at is None and data.get("started_at") is not None:
                # a short task's start was folded away: its readers still see start, output, done
                events.append(Event(kind="start", uuid=row.uuid, hostname=row.hostname, taskid=row.taskid, seq=0))
            events += [self._out(row, first + i, piece[0], piece[1]) for i, piece in enumerate(folded)]
            row.exit_code = data.get("exit_code")
            row.started_at = row.started_at or data.get("started_at")
            row.finished_at = data.get("finished_at") or time.time()
            row.error = data.get("error")
            row.truncated = data.get("truncated") or {}
            row.result = data.get("result")
            row.status = data.get("status", TaskStatus.ERROR.value)  # last: readers in other threads key on it
            events.append(Event(kind="done", uuid=row.uuid, hostname=row.hostname, taskid=row.taskid, seq=seq,
                                status=row.status, exit_code=row.exit_code, error=row.error, result=row.result))
            return events
        return []

    @staticmethod
    def _out(row: _Row, seq: int, stream: Any, text: str) -> Event:
        name = "stderr" if stream == "stderr" else "stdout"
        row.chunks[name].append((seq, text))
        return Event(kind=name, uuid=row.uuid, hostname=row.hostname, taskid=row.taskid, seq=seq, data=text)

    async def wait(self, timeout: float | None = None) -> AsyncRun:
        """Wait until every target has a final status."""
        with anyio.fail_after(timeout):
            async for _ in self.events():
                pass
        return self

    async def to_dataframe(self) -> pd.DataFrame:
        await self.wait()
        return self.snapshot()

    async def cancel(self) -> int:
        """Stop the command on every target still running it (the process group is killed)."""
        # asking twice asks once: the second finds the tasks already cancelling
        body = await self._link.request("POST", f"/api/v1/runs/{self.id}/cancel", idempotent=True)
        return int(body["cancelling"])

    def view(self, /, **options: Any) -> ResultView:
        """The results so far as a person reads them (see :class:`ResultView`); the data stays
        in :meth:`snapshot` / :meth:`to_dataframe`."""
        return ResultView(self.snapshot(), **options)

    def snapshot(self) -> pd.DataFrame:
        """The results so far, one row per target (status None where not finished)."""
        import pandas as pd

        recs = []
        for row in self._rows.values():
            started = _ts(row.started_at)
            finished = _ts(row.finished_at)
            duration = (row.finished_at - row.started_at) if row.finished_at and row.started_at else None
            recs.append({
                "uuid": row.uuid, "hostname": row.hostname, "status": row.status, "exit_code": row.exit_code,
                "stdout": row.text("stdout"), "stderr": row.text("stderr"), "started_at": started,
                "finished_at": finished, "duration_s": duration, "error": row.error,
                "truncated": bool(row.truncated and any(row.truncated.values())), "taskid": row.taskid,
                "result": row.result,
            })
        df = pd.DataFrame.from_records(recs, columns=COLUMNS)
        df["exit_code"] = df["exit_code"].astype("Int64")
        df["duration_s"] = df["duration_s"].astype("float64")
        for col in ("started_at", "finished_at"):
            df[col] = pd.to_datetime(df[col], utc=True)
        return df


def _ts(value: float | None) -> Any:
    import pandas as pd

    return pd.Timestamp(value, unit="s", tz="UTC") if value else pd.NaT


class Run(SyncFace[AsyncRun]):
    """The synchronous face of :class:`AsyncRun` (what :meth:`Client.run` returns)."""

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def done(self) -> bool:
        return self._async.done

    @property
    def total(self) -> int:
        return self._async.total

    outcomes = local(AsyncRun.outcomes)
    counts = local(AsyncRun.counts)
    events = iterating(AsyncRun.events)
    wait = blocking_self(AsyncRun.wait)
    to_dataframe = blocking(AsyncRun.to_dataframe)
    snapshot = local(AsyncRun.snapshot)
    view = local(AsyncRun.view)
    cancel = blocking(AsyncRun.cancel)
