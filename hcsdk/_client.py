"""The SDK's clients. :class:`AsyncClient` is the implementation; :class:`Client` is the same
API for synchronous code, driven through one background event loop (see ``_portal``)."""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from hcsdk import _proxies, _release, _schedules
from hcsdk._agents import Agents, AsyncAgents
from hcsdk._artifacts import Artifacts, AsyncArtifacts
from hcsdk._plugins import AsyncPlugins, Plugins
from hcsdk._portal import portal
from hcsdk._run import AsyncRun, Event
from hcsdk._targets import TargetsLike, target_spec
from hcsdk.common.config import load_client_config
from hcsdk.common.errors import ConfigError, UsageError
from hcsdk.net.http import check, map_exceptions
from hcsdk.net.tls import client_context

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._display import ResultView

__all__ = ["AsyncClient", "Client", "Run"]

INVENTORY_COLUMNS = ["uuid", "hostname", "kind", "os", "os_version", "kernel", "arch", "cpus", "mem_total", "ips",
                     "online", "mode", "via", "last_seen", "labels", "agent_version", "connects", "enrolled_at"]


def _script_args(script: str | bytes | Sequence[str] | None, cmd: str | None,
                 args: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    if isinstance(script, bytes):
        try:
            script = script.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"the script is not valid UTF-8 (byte {exc.start}): pass text, "
                               "or encode binary content (e.g. base64) inside the script") from None
    if cmd is None:
        cmd = "exec" if script is not None and not isinstance(script, str) else "shell"
    merged = dict(args or {})
    if script is not None:
        if cmd == "exec":
            merged["argv"] = _argv(script)
        else:
            merged["script"] = script
    return cmd, merged


def _argv(script: str | Sequence[str]) -> list[str]:
    # list("echo hi") would be ['e', 'c', ...]: a string is never an argv, so say what to pass
    if isinstance(script, str):
        raise UsageError(f"cmd='exec' takes an argv list, e.g. {script.split() or ['echo', 'hi']!r}, "
                           f"not the string {script!r} (for a shell script use cmd='shell', the default)")
    argv = list(script)
    bad = next((a for a in argv if not isinstance(a, str)), None)
    if bad is not None or not argv:
        raise UsageError("cmd='exec' takes a non-empty list of strings (program and arguments)"
                           + (f"; got {type(bad).__name__} {bad!r}" if bad is not None else ""))
    return argv


class AsyncClient:
    """Talks to a master.

    >>> client = AsyncClient()                       # from ZY_CONFIG / ZY_MASTER / ~/.config/zy
    >>> run = await client.run("uptime", targets="label:role=web", timeout=30)
    >>> df = await run.to_dataframe()
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, ca: str | None = None,
                 timeout: float = 30.0, http2: bool = True):
        if url is None:
            cfg = load_client_config()
            url, token, ca = cfg.url, token or cfg.token, ca or cfg.ca
        if not token:
            raise ConfigError("a token is needed to talk to the master")
        self.url = url.rstrip("/")
        self._stream_timeout = httpx.Timeout(timeout, read=60.0)
        self._http = httpx.AsyncClient(
            base_url=self.url, http2=http2, verify=client_context(ca, http2=http2),
            headers={"authorization": f"Bearer {token}"}, timeout=timeout,
        )
        #: install, list and remove plugins on agents
        self.plugins = AsyncPlugins(self)
        #: update agents online, in batches
        self.agents = AsyncAgents(self)
        #: files on the master, to release
        self.artifacts = AsyncArtifacts(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _check(self, resp: httpx.Response) -> Any:
        return check(resp)

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        with map_exceptions(self.url):
            resp = await self._http.request(method, path, **kwargs)
        return check(resp)

    async def status(self) -> dict[str, Any]:
        return dict(await self._request("GET", "/api/v1/status"))

    async def inventory(self, targets: str | None = None) -> pd.DataFrame:
        """Enrolled agents, one row each: uuid, hostname, os, online, last_seen, labels, ...

        ``targets`` narrows it with the same expressions :meth:`run` takes
        (``"web-*"``, ``"label:role=web"``, a uuid or hostname)."""
        import pandas as pd

        params = {"targets": targets} if targets else None
        rows = await self._request("GET", "/api/v1/inventory", params=params)
        recs = []
        for row in rows:
            facts = row.get("facts") or {}
            recs.append({**{k: facts.get(k) for k in INVENTORY_COLUMNS}, **{
                "uuid": row["uuid"], "hostname": row["hostname"], "online": row["online"], "mode": row.get("mode"),
                "kind": row.get("kind", "agent"), "via": row.get("via", []),
                "labels": row["labels"], "connects": row["connects"],
                "last_seen": row["last_seen"], "enrolled_at": row["enrolled_at"]}})
        df = pd.DataFrame.from_records(recs, columns=INVENTORY_COLUMNS)
        for col in ("last_seen", "enrolled_at"):
            df[col] = pd.to_datetime(df[col], unit="s", utc=True)
        return df

    async def run(self, script: str | bytes | Sequence[str] | None = None, *, targets: TargetsLike,
                  cmd: str | None = None, args: dict[str, Any] | None = None, timeout: float = 600) -> AsyncRun:
        """Start ``script`` (shell) or an argv list (exec) on ``targets``; returns at once.

        Targets: a uuid, a list of uuids, a glob on hostname/uuid (``"web-*"``), a label
        selector (``"label:role=web,idc=hk"``) or a DataFrame with a ``uuid`` column.
        """
        cmd, merged = _script_args(script, cmd, args)
        body = {"cmd": cmd, "args": merged, "targets": target_spec(targets), "timeout": timeout}
        return AsyncRun(self, await self._request("POST", "/api/v1/runs", json=body))

    async def release(self, artifact: str, targets: TargetsLike, *, dest: str, batch: int | str = 10,
                      pre: str | None = None, post: str | None = None, health: str | None = None,
                      rollback: str | None = None, max_failures: int | str = 0,
                      pause_between: str | float = 0, mode: int = 0o644, timeout: float = 600, p2p: bool = True,
                      rate: float = 0) -> _release.AsyncRelease:
        """Roll ``artifact`` (id or name) out to ``targets`` in shards of ``batch`` (a count or
        ``"20%"``): fetch (proxy cache), ``pre``, place at ``dest`` atomically (previous kept),
        ``post``, ``health``; pause once more than ``max_failures`` (count or ``"5%"``) failed.
        ``p2p`` lets agents share chunks (their proxy tracks who has what); ``rate`` caps each
        agent's download in bytes a second."""
        return await _release.create(self, artifact, targets, dest, batch=batch, pre=pre, post=post, health=health,
                                     rollback=rollback, max_failures=max_failures, pause_between=pause_between,
                                     mode=mode, timeout=timeout, p2p=p2p, rate=rate)

    async def releases(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame.from_records(await self._request("GET", "/api/v1/releases"))

    async def schedule(self, cmd: str, every: str | float, *, targets: TargetsLike,
                       args: dict[str, Any] | None = None, name: str | None = None,
                       timeout: float | None = None) -> _schedules.AsyncSchedule:
        """Run ``cmd`` on ``targets`` every ``every`` ("10s", "5m", "1h" or seconds); the agents
        keep the schedule and send one sample per run. ``name`` defaults to ``CMD-EVERY``;
        setting a schedule again under its name replaces it."""
        info = await _schedules.create(self, cmd, every, targets, args, name, timeout)
        return _schedules.AsyncSchedule(self, info)

    async def series(self, name: str, since: Any = None, until: Any = None) -> pd.DataFrame:
        """A schedule's samples: indexed by time, with uuid, hostname, status, error and one
        column per field the command returned."""
        return await _schedules.series(self, name, since, until)

    async def schedules(self) -> pd.DataFrame:
        return await _schedules.listing(self)

    async def cancel_schedule(self, name: str) -> dict[str, Any]:
        """Stop a schedule on its agents (the samples collected so far stay)."""
        return await _schedules.cancel(self, name)

    async def proxies(self) -> pd.DataFrame:
        """Proxies, one row each, with their chunk cache's counters (bytes from upstream, bytes
        served, hit ratio, entries, evictions, corrupt chunks caught, ...)."""
        return await _proxies.proxies(self)

    async def create_join_token(self, ttl: float = 86400, description: str = "",
                                proxies: list[str] | None = None, *, kind: str = "agent",
                                proxy_names: list[str] | None = None, uses: int = 0) -> dict[str, Any]:
        """A join token; with ``proxies``, agents joining with it connect (and enroll) through them.

        ``kind`` is what it enrolls: ``"agent"`` or ``"proxy"``; a proxy token needs
        ``proxy_names``, the only hosts the master will put in that proxy's certificate.
        ``uses`` limits how many enrollments it allows (0: any number until it expires)."""
        body = {"ttl": ttl, "description": description, "urls": list(proxies or []), "kind": kind,
                "proxy_names": list(proxy_names or []), "uses": uses}
        return dict(await self._request("POST", "/api/v1/tokens", json=body))

    async def join_tokens(self) -> list[dict[str, Any]]:
        return list(await self._request("GET", "/api/v1/tokens"))

    async def revoke_join_token(self, token_id: str) -> None:
        await self._request("DELETE", f"/api/v1/tokens/{token_id}")

    async def revoke_agent(self, uuid: str) -> None:
        """The agent is dropped now and can never reconnect with its credential."""
        await self._request("POST", f"/api/v1/agents/{uuid}/revoke")

    async def disconnect_agent(self, uuid: str) -> None:
        """Close an agent's channel (it reconnects on its own, losing nothing)."""
        await self._request("POST", f"/api/v1/agents/{uuid}/disconnect")


class Run:
    """The synchronous face of :class:`AsyncRun`."""

    def __init__(self, arun: AsyncRun):
        self._arun = arun

    def __repr__(self) -> str:
        return repr(self._arun).replace("AsyncRun", "Run")

    @property
    def id(self) -> str:
        return self._arun.id

    @property
    def done(self) -> bool:
        return self._arun.done

    @property
    def total(self) -> int:
        return self._arun.total

    def counts(self) -> dict[str, int]:
        return self._arun.counts()

    def events(self) -> Iterator[Event]:
        """Yield events as they arrive (output chunks, then a final ``done`` per target)."""
        # One task in the portal drives the async iterator (it holds the run's lock across
        # yields); events cross to this thread through a queue.
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        async def pump() -> None:
            try:
                async for event in self._arun.events():
                    events.put(("event", event))
                events.put(("end", None))
            except BaseException as exc:
                events.put(("error", exc))
                raise

        future = portal().start_task_soon(pump)
        try:
            while True:
                kind, value = events.get()
                if kind == "event":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            if not future.done():
                future.cancel()

    def wait(self, timeout: float | None = None) -> Run:
        portal().call(self._arun.wait, timeout)
        return self

    def to_dataframe(self) -> pd.DataFrame:
        """Wait for every target, then one row per target."""
        return portal().call(self._arun.to_dataframe)

    def snapshot(self) -> pd.DataFrame:
        return self._arun.snapshot()

    def view(self, **options: Any) -> ResultView:
        """The results so far as a person reads them; the data stays in :meth:`to_dataframe`."""
        return self._arun.view(**options)

    def cancel(self) -> int:
        return portal().call(self._arun.cancel)


class Client:
    """The synchronous SDK: the same methods as :class:`AsyncClient`, blocking.

    >>> from hcsdk import Client
    >>> client = Client()
    >>> client.run("uname -a", targets="web-*", timeout=30).to_dataframe()
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, ca: str | None = None,
                 timeout: float = 30.0, http2: bool = True):
        self._async = portal().call(lambda: _make_async(url, token, ca, timeout, http2))
        #: install, list and remove plugins on agents
        self.plugins = Plugins(self._async.plugins)
        #: update agents online, in batches
        self.agents = Agents(self._async.agents)
        #: files on the master, to release
        self.artifacts = Artifacts(self._async.artifacts)

    @property
    def url(self) -> str:
        return self._async.url

    def close(self) -> None:
        portal().call(self._async.aclose)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        return portal().call(self._async.status)

    def inventory(self, targets: str | None = None) -> pd.DataFrame:
        return portal().call(self._async.inventory, targets)

    def run(self, script: str | bytes | Sequence[str] | None = None, *, targets: TargetsLike,
            cmd: str | None = None, args: dict[str, Any] | None = None, timeout: float = 600) -> Run:
        async def start() -> AsyncRun:
            return await self._async.run(script, targets=targets, cmd=cmd, args=args, timeout=timeout)

        future = portal().start_task_soon(start)
        try:
            return Run(future.result())
        except KeyboardInterrupt:
            # Ctrl-C while the master was creating the run: it may exist already and must not
            # be left running on the targets.
            try:
                created = future.result(timeout=10)
            except Exception:
                raise KeyboardInterrupt from None
            portal().call(created.cancel)
            raise

    def release(self, artifact: str, targets: TargetsLike, *, dest: str, batch: int | str = 10,
                pre: str | None = None, post: str | None = None, health: str | None = None,
                rollback: str | None = None, max_failures: int | str = 0, pause_between: str | float = 0,
                mode: int = 0o644, timeout: float = 600, p2p: bool = True, rate: float = 0) -> _release.Release:
        async def start() -> _release.AsyncRelease:
            return await self._async.release(artifact, targets, dest=dest, batch=batch, pre=pre, post=post,
                                             health=health, rollback=rollback, max_failures=max_failures,
                                             pause_between=pause_between, mode=mode, timeout=timeout, p2p=p2p,
                                             rate=rate)

        return _release.Release(portal().call(start))

    def releases(self) -> pd.DataFrame:
        return portal().call(self._async.releases)

    def schedule(self, cmd: str, every: str | float, *, targets: TargetsLike, args: dict[str, Any] | None = None,
                 name: str | None = None, timeout: float | None = None) -> _schedules.Schedule:
        async def start() -> _schedules.AsyncSchedule:
            return await self._async.schedule(cmd, every, targets=targets, args=args, name=name, timeout=timeout)

        return _schedules.Schedule(portal().call(start))

    def series(self, name: str, since: Any = None, until: Any = None) -> pd.DataFrame:
        return portal().call(self._async.series, name, since, until)

    def schedules(self) -> pd.DataFrame:
        return portal().call(self._async.schedules)

    def cancel_schedule(self, name: str) -> dict[str, Any]:
        return portal().call(self._async.cancel_schedule, name)

    def proxies(self) -> pd.DataFrame:
        return portal().call(self._async.proxies)

    def create_join_token(self, ttl: float = 86400, description: str = "",
                          proxies: list[str] | None = None, *, kind: str = "agent",
                          proxy_names: list[str] | None = None, uses: int = 0) -> dict[str, Any]:
        return portal().call(lambda: self._async.create_join_token(ttl, description, proxies, kind=kind,
                                                                   proxy_names=proxy_names, uses=uses))

    def join_tokens(self) -> list[dict[str, Any]]:
        return portal().call(self._async.join_tokens)

    def revoke_join_token(self, token_id: str) -> None:
        portal().call(self._async.revoke_join_token, token_id)

    def revoke_agent(self, uuid: str) -> None:
        portal().call(self._async.revoke_agent, uuid)

    def disconnect_agent(self, uuid: str) -> None:
        portal().call(self._async.disconnect_agent, uuid)


async def _make_async(url: str | None, token: str | None, ca: str | None, timeout: float,
                      http2: bool) -> AsyncClient:
    return AsyncClient(url, token=token, ca=ca, timeout=timeout, http2=http2)
