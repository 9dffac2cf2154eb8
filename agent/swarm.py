"""Many agents in one process (`zy swarm`), to load a master or a proxy with thousands of them.

Each swarm agent is the real agent: its own enrollment (uuid, credential, X25519 key), its own
TLS connection and HTTP/2 streams, and the real channel, executor and message authentication.
What the swarm shares, and a fleet of real agents would not:

- one process and one event loop, so one core, for all of them;
- one TLS client context per pinned CA (a real agent builds one and reuses it too);
- the facts, gathered once, each agent reporting its own hostname;
- the outbox, kept in memory instead of SQLite (agent.memspool).

The in-process ``echo`` plugin measures the channel rather than fork and exec; real commands
(``shell``, ``exec``) run too, as processes.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskGroup

from hcsdk.common import facts as facts_mod
from hcsdk.common.errors import JoinTokenError
from hcsdk.common.identity import StateDir
from hcsdk.common.jointoken import JOIN_ENV, JoinToken
from hcsdk.net.channel import Rejected
from hcsdk.net.enroll import EnrollError, enroll
from hcsdk.net.settings import ChannelSettings
from hcsdk.protocol.tasks import ChannelMode

from .core import Agent
from .memspool import MemorySpool

log = logging.getLogger("zy.swarm")


class SwarmError(Exception):
    """The swarm cannot start (no token for unenrolled agents, enrollment refused)."""


def source_address(index: int) -> str:
    """A distinct loopback address per agent, so 10,000 connections never run out of ports."""
    return str(ipaddress.IPv4Address("127.1.0.1") + index)


def all_loopback(urls: list[str]) -> bool:
    try:
        return bool(urls) and all(ipaddress.ip_address(urlsplit(u).hostname or "").is_loopback for u in urls)
    except ValueError:
        return False


class AgentSwarm:
    """``join`` is the join token, or a function reading it (see ``hcsdk.common.jointoken.read_join``),
    called only when some agent is not enrolled yet."""

    def __init__(self, root: Path, count: int, join: str | Callable[[], str | None] | None, urls: list[str],
                 labels: dict[str, str], name: str = "swarm", http2: bool = True, heartbeat: float = 5.0,
                 dead_after: float = 12.0, spread_source: bool = True) -> None:
        self.root = root
        self.count = count
        self.join = join
        self.urls = urls
        self.labels = labels
        self.name = name
        self.http2 = http2
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.spread_source = spread_source
        self.agents: list[Agent] = []
        self.rejected = 0
        self._facts = facts_mod.collect()

    def hostname(self, index: int) -> str:
        return f"{self.name}-{index:05d}"

    def state(self, index: int) -> StateDir:
        return StateDir(self.root / f"{index:05d}")

    def facts(self, index: int) -> dict[str, Any]:
        return {**self._facts, "hostname": self.hostname(index)}

    # -- enrollment ---------------------------------------------------------------------------
    async def enroll_missing(self, concurrency: int = 32) -> int:
        """Enroll the agents that have no identity yet; returns how many were enrolled."""
        self.root.mkdir(parents=True, exist_ok=True)
        missing = [i for i in range(self.count) if not self.state(i).load().enrolled]
        if not missing:
            return 0
        try:
            text = self.join() if callable(self.join) else self.join
            if not text:
                raise SwarmError(f"{len(missing)} of {self.count} agents are not enrolled yet: pass "
                                 f"--join-file PATH (or {JOIN_ENV}=TOKEN)")
            token = JoinToken.decode(text)
        except JoinTokenError as exc:
            raise SwarmError(str(exc)) from None
        if token.kind != "agent":
            raise SwarmError(f"this is a {token.kind} token; swarm agents need one from `zy token create`")
        limiter = anyio.CapacityLimiter(concurrency)
        failures: list[str] = []
        done = 0
        ca_pem: bytes | None = None  # fetched and checked by the first enrollment, then shared

        async def one(index: int) -> None:
            nonlocal done
            async with limiter:
                state = self.state(index)
                try:
                    await enroll(state, state.load(), token, self.facts(index), self.labels, urls=self.urls or None,
                                 ca_pem=ca_pem)
                except EnrollError as exc:
                    failures.append(f"{self.hostname(index)}: {exc}")
                done += 1
                if done % 500 == 0 or done == len(missing):
                    print(f"zy swarm: enrolled {done - len(failures)}/{len(missing)}", flush=True)

        await one(missing[0])
        if failures:
            raise SwarmError(f"enrollment failed: {failures[0]}")
        ca_pem = self.state(missing[0]).ca_path.read_bytes()
        async with anyio.create_task_group() as tg:
            for index in missing[1:]:
                tg.start_soon(one, index)
        if failures:
            raise SwarmError(f"{len(failures)} enrollments failed, the first: {failures[0]}")
        return len(missing)

    # -- running ------------------------------------------------------------------------------
    def make_agent(self, index: int) -> Agent:
        state = self.state(index)
        ident = state.load()
        if self.urls:
            ident.urls = list(self.urls)
        spread = self.spread_source and all_loopback(ident.urls)
        settings = ChannelSettings(heartbeat=self.heartbeat, dead_after=self.dead_after, http2=self.http2,
                                   local_address=source_address(index) if spread else None)
        agent = Agent(state, ident, hostname=self.hostname(index), settings=settings, spool=MemorySpool())
        agent.channel.facts = lambda: self.facts(index)
        return agent

    async def start_all(self, tg: TaskGroup, ramp: float = 500.0) -> None:
        """Start every agent, at most ``ramp`` per second: a swarm should not be its own storm."""
        step = max(1, int(ramp / 10))
        for index in range(self.count):
            agent = self.make_agent(index)
            self.agents.append(agent)
            tg.start_soon(self._serve, agent)
            if (index + 1) % step == 0:
                await anyio.sleep(step / ramp)

    async def _serve(self, agent: Agent) -> None:
        try:
            await agent.run(handle_signals=False)
        except Rejected as exc:
            self.rejected += 1
            log.error("%s: the master refused this agent: %s", agent.hostname, exc)

    def status(self) -> dict[str, int]:
        modes = [a.channel.mode for a in self.agents]
        return {"agents": self.count, "started": len(self.agents), "h2": modes.count(ChannelMode.H2),
                "poll": modes.count(ChannelMode.POLL), "rejected": self.rejected,
                "tasks_done": sum(a.spool.finished for a in self.agents if isinstance(a.spool, MemorySpool)),
                "reconnects": sum(max(0, a.channel.connects - 1) for a in self.agents)}

    async def report(self, every: float) -> None:
        last = None
        while True:
            await anyio.sleep(every)
            s = self.status()
            line = (f"zy swarm: {s['h2'] + s['poll']}/{s['agents']} connected (h2 {s['h2']}, poll {s['poll']}), "
                    f"{s['reconnects']} reconnects, {s['rejected']} refused, {s['tasks_done']} tasks done")
            if line != last:
                print(line, flush=True)
                last = line
