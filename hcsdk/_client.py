"""The SDK's clients. :class:`AsyncClient` is the implementation; :class:`Client` is the same
API for synchronous code, derived from it (``_sync``) and driven through one background event
loop (``_portal``).

The client and its sibling modules (runs, releases, schedules, plugins, agents, artifacts) talk
to the master only through a :class:`~hcsdk._link.MasterLink` (``_link``), which each sibling is
given when it is made; nothing but ``_link`` touches the httpx client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx

from hcsdk import _proxies, _schedules
from hcsdk._agents import Agents, AsyncAgents
from hcsdk._artifacts import Artifacts, AsyncArtifacts
from hcsdk._link import HttpLink
from hcsdk._plugins import AsyncPlugins, Plugins
from hcsdk._portal import portal
from hcsdk._release import AsyncRelease, Release, create_release
from hcsdk._run import AsyncRun, Run
from hcsdk._schedules import AsyncSchedule, Schedule
from hcsdk._sync import SyncFace, blocking, wrapping
from hcsdk._targets import TargetsLike, target_spec
from hcsdk.common.config import load_client_config, parse_urls
from hcsdk.common.errors import ConfigError, UsageError
from hcsdk.protocol.names import new_run_id

if TYPE_CHECKING:
    import pandas as pd

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

    ``url`` may name several masters of one control plane (``"https://a:8443,https://b:8443"``
    or a list), the preferred first: a request that cannot connect to one goes to the next, and
    the client stays with the one that answered. A request that may have reached a master is
    never sent to another (a run is never created twice), except reads.

    ``transport`` (an ``httpx.AsyncBaseTransport``) replaces the network: with
    ``httpx.MockTransport(handler)`` a test answers the SDK's requests in-process, no master
    needed (``ca`` and ``http2`` then do not apply).
    """

    def __init__(self, url: str | Sequence[str] | None = None, *, token: str | None = None, ca: str | None = None,
                 timeout: float = 30.0, http2: bool = True, transport: httpx.AsyncBaseTransport | None = None):
        if url is None:
            cfg = load_client_config()
            urls, token, ca = cfg.urls, token or cfg.token, ca or cfg.ca
        else:  # one URL, "A,B", or a list: every master's URL, the preferred first
            urls = parse_urls(url, "the master URL")
        if not token:
            raise ConfigError("a token is needed to talk to the master")
        #: every master's URL, the preferred first (the SDK moves on when one cannot be reached)
        self.urls = urls
        # the siblings are given it as a MasterLink: its three calls, not the httpx client
        self._link = HttpLink(urls, token, ca=ca, timeout=timeout, http2=http2, transport=transport)
        #: install, list and remove plugins on agents
        self.plugins = AsyncPlugins(self)
        #: update agents online, in batches
        self.agents = AsyncAgents(self, self._link)
        #: files on the master, to release
        self.artifacts = AsyncArtifacts(self._link)

    @property
    def url(self) -> str:
        """The master the client talks to now: the first of :attr:`urls` that answered."""
        return self._link.url

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections to the master."""
        await self._link.aclose()

    # -- the API -------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """The master's counters: agents enrolled and online, runs, version."""
        return dict(await self._link.request("GET", "/api/v1/status"))

    async def inventory(self, targets: str | None = None) -> pd.DataFrame:
        """Enrolled agents, one row each: uuid, hostname, os, online, last_seen, labels, ...

        ``targets`` narrows it with the same expressions :meth:`run` takes
        (``"web-*"``, ``"label:role=web"``, a uuid or hostname)."""
        import pandas as pd

        params = {"targets": targets} if targets else None
        rows = await self._link.request("GET", "/api/v1/inventory", params=params)
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
        # named here, so that the request may go again to another master should this one die
        # with it unanswered: the master makes one run of one id
        body = {"cmd": cmd, "args": merged, "targets": target_spec(targets), "timeout": timeout,
                "run_id": new_run_id(16)}
        return AsyncRun(self._link, await self._link.request("POST", "/api/v1/runs", json=body, idempotent=True))

    async def release(self, artifact: str, targets: TargetsLike, *, dest: str, batch: int | str = 10,
                      pre: str | None = None, post: str | None = None, health: str | None = None,
                      rollback: str | None = None, max_failures: int | str = 0,
                      pause_between: str | float = 0, mode: int = 0o644, timeout: float = 600, p2p: bool = True,
                      rate: float = 0) -> AsyncRelease:
        """Roll ``artifact`` (id or name) out to ``targets`` in shards of ``batch`` (a count or
        ``"20%"``): fetch (proxy cache), ``pre``, place at ``dest`` atomically (previous kept),
        ``post``, ``health``; pause once more than ``max_failures`` (count or ``"5%"``) failed.
        ``p2p`` lets agents share chunks (their proxy tracks who has what); ``rate`` caps each
        agent's download in bytes a second."""
        return await create_release(self._link, artifact, targets, dest, batch=batch, pre=pre, post=post,
                                    health=health, rollback=rollback, max_failures=max_failures,
                                    pause_between=pause_between, mode=mode, timeout=timeout, p2p=p2p, rate=rate)

    async def get_release(self, release_id: str) -> AsyncRelease:
        """A release started earlier (by anyone), by its id, to watch or steer."""
        return AsyncRelease(self._link, await self._link.request("GET", f"/api/v1/releases/{release_id}"))

    async def releases(self) -> pd.DataFrame:
        """Every release, one row each, with its state."""
        import pandas as pd

        return pd.DataFrame.from_records(await self._link.request("GET", "/api/v1/releases"))

    async def schedule(self, cmd: str, every: str | float, *, targets: TargetsLike,
                       args: dict[str, Any] | None = None, name: str | None = None,
                       timeout: float | None = None) -> AsyncSchedule:
        """Run ``cmd`` on ``targets`` every ``every`` ("10s", "5m", "1h" or seconds); the agents
        keep the schedule and send one sample per run. ``name`` defaults to ``CMD-EVERY``;
        setting a schedule again under its name replaces it."""
        info = await _schedules.create(self._link, cmd, every, targets, args, name, timeout)
        return AsyncSchedule(self._link, info)

    async def series(self, name: str, since: Any = None, until: Any = None) -> pd.DataFrame:
        """A schedule's samples: indexed by time, with uuid, hostname, status, error and one
        column per field the command returned."""
        return await _schedules.series(self._link, name, since, until)

    async def schedules(self) -> pd.DataFrame:
        """What is scheduled, one row per schedule, with sample counts."""
        return await _schedules.listing(self._link)

    async def cancel_schedule(self, name: str) -> dict[str, Any]:
        """Stop a schedule on its agents (the samples collected so far stay)."""
        return await _schedules.cancel(self._link, name)

    async def proxies(self) -> pd.DataFrame:
        """Proxies, one row each, with their chunk cache's counters (bytes from upstream, bytes
        served, hit ratio, entries, evictions, corrupt chunks caught, ...)."""
        return await _proxies.proxies(self._link)

    async def create_join_token(self, ttl: float = 86400, description: str = "",
                                proxies: list[str] | None = None, *, kind: str = "agent",
                                proxy_names: list[str] | None = None, uses: int = 0) -> dict[str, Any]:
        """A join token; with ``proxies``, agents joining with it connect (and enroll) through them.

        ``kind`` is what it enrolls: ``"agent"`` or ``"proxy"``; a proxy token needs
        ``proxy_names``, the only hosts the master will put in that proxy's certificate.
        ``uses`` limits how many enrollments it allows (0: any number until it expires)."""
        body = {"ttl": ttl, "description": description, "urls": list(proxies or []), "kind": kind,
                "proxy_names": list(proxy_names or []), "uses": uses}
        return dict(await self._link.request("POST", "/api/v1/tokens", json=body))

    async def join_tokens(self) -> list[dict[str, Any]]:
        """Every join token, with its kind, uses and state."""
        return list(await self._link.request("GET", "/api/v1/tokens"))

    async def revoke_join_token(self, token_id: str) -> None:
        """No more enrollments with this token (agents it enrolled keep their credentials)."""
        await self._link.request("DELETE", f"/api/v1/tokens/{token_id}")

    async def revoke_agent(self, uuid: str) -> None:
        """The agent is dropped now and can never reconnect with its credential."""
        await self._link.request("POST", f"/api/v1/agents/{uuid}/revoke")

    async def disconnect_agent(self, uuid: str) -> None:
        """Close an agent's channel (it reconnects on its own, losing nothing)."""
        await self._link.request("POST", f"/api/v1/agents/{uuid}/disconnect")


class Client(SyncFace[AsyncClient]):
    """The synchronous SDK: the same methods as :class:`AsyncClient`, blocking.

    >>> from hcsdk import Client
    >>> client = Client()
    >>> client.run("uname -a", targets="web-*", timeout=30).to_dataframe()
    """

    def __init__(self, url: str | Sequence[str] | None = None, *, token: str | None = None, ca: str | None = None,
                 timeout: float = 30.0, http2: bool = True, transport: httpx.AsyncBaseTransport | None = None):
        async def make() -> AsyncClient:  # on the portal's loop, which will drive it
            return AsyncClient(url, token=token, ca=ca, timeout=timeout, http2=http2, transport=transport)

        super().__init__(portal().call(make))
        #: install, list and remove plugins on agents
        self.plugins = Plugins(self._async.plugins)
        #: update agents online, in batches
        self.agents = Agents(self._async.agents)
        #: files on the master, to release
        self.artifacts = Artifacts(self._async.artifacts)

    def __repr__(self) -> str:
        return f"<Client {self.url}>"

    @property
    def url(self) -> str:
        """The master the client talks to now: the first of :attr:`urls` that answered."""
        return self._async.url

    @property
    def urls(self) -> tuple[str, ...]:
        """Every master's URL, the preferred first."""
        return self._async.urls

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    close = blocking(AsyncClient.aclose)
    status = blocking(AsyncClient.status)
    inventory = blocking(AsyncClient.inventory)
    # a Ctrl-C while the master creates the run cancels it once it exists
    run = wrapping(AsyncClient.run, Run, undo=AsyncRun.cancel)
    release = wrapping(AsyncClient.release, Release)
    get_release = wrapping(AsyncClient.get_release, Release)
    releases = blocking(AsyncClient.releases)
    schedule = wrapping(AsyncClient.schedule, Schedule)
    series = blocking(AsyncClient.series)
    schedules = blocking(AsyncClient.schedules)
    cancel_schedule = blocking(AsyncClient.cancel_schedule)
    proxies = blocking(AsyncClient.proxies)
    create_join_token = blocking(AsyncClient.create_join_token)
    join_tokens = blocking(AsyncClient.join_tokens)
    revoke_join_token = blocking(AsyncClient.revoke_join_token)
    revoke_agent = blocking(AsyncClient.revoke_agent)
    disconnect_agent = blocking(AsyncClient.disconnect_agent)
