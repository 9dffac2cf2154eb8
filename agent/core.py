"""An agent: its identity and spool, the executor, and the channel, wired together."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from hcsdk.common import facts as facts_mod
from hcsdk.common.identity import Identity, StateDir
from hcsdk.net.channel import Channel, Rejected
from hcsdk.net.settings import ChannelSettings
from hcsdk.protocol import vocab
from hcsdk.protocol.e2e import verify
from hcsdk.protocol.errors import MessageError
from hcsdk.protocol.messages import DOWN, Ack, Cancel, Message, parse
from hcsdk.protocol.messages import Task as TaskMessage
from hcsdk.protocol.tasks import TaskStatus

from .children import watch_children_by_pidfd
from .executor import Executor, Task, TaskFailed
from .memspool import MemorySpool
from .plugin_host import InstallError, PluginHost
from .release.chunkstore import ChunkStore
from .release.commands import Releases
from .release.peer import PeerServer, PeerSettings
from .scheduler import Scheduler
from .spool import Spool
from .systemd import notify
from .update import Updater
from .worker_parent import WorkerProcess

log = logging.getLogger("zy.agent")
#: a plugin runs one task and returns (status, exit code)
Plugin = Callable[[Task], Awaitable[tuple[str, int | None]]]


class Agent:
    def __init__(self, state: StateDir, ident: Identity, hostname: str | None = None,
                 settings: ChannelSettings | None = None, output_cap: int | None = None,
                 spool: Spool | MemorySpool | None = None, plugins: dict[str, Plugin] | None = None,
                 worker_memory_mib: int = 512, handover: tuple[str, int] | None = None,
                 peer: PeerSettings | None = None, keep_releases: int = 3):
        self.state = state
        self.ident = ident
        self.hostname = hostname
        self.spool: Spool | MemorySpool = spool if spool is not None else Spool(state.spool_path)
        if not ident.e2e_key:
            raise ValueError(f"{state.identity_path} has no end-to-end key: enroll this agent again")
        self.key = bytes.fromhex(ident.e2e_key)
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        kwargs: dict[str, Any] = {"output_cap": output_cap} if output_cap else {}
        self.executor = Executor(ident.uuid, self.emit, self.spool.claim, self._finish, hostname,
                                 started=self.spool.set_pgid, **kwargs)
        self.executor.plugins.update(plugins or {})
        self.worker = WorkerProcess(ident.uuid, memory_limit_mib=worker_memory_mib)
        self.executor.worker = self.worker
        self.executor.host = self.plugins = PluginHost(state.root / "plugins", self.worker,
                                                        builtin=lambda: set(self.executor.plugins))
        self.handover = handover
        self.scheduler = Scheduler(self, state.root / "schedules.json")
        self.updater = Updater(self, self.scheduler, handover)
        chunks = ChunkStore(state.root / "releases")
        self.releases = Releases(self, chunks, PeerServer(chunks, **vars(peer)) if peer is not None else None,
                                 keep=keep_releases)
        self.executor.plugins.update(self._system_cmds())
        self.channel = Channel(
            ident.uuid, ident.credential, ident.urls, state.ca_path.read_bytes(),
            facts=lambda: facts_mod.collect(self.hostname), labels=ident.labels,
            outbox=self._outbox, on_message=self._on_message, wake=self._current_wake,
            settings=settings,
        )
        self.channel.on_connected = self._connected
        self.executor.fold = lambda: self.channel.fold
        self._took_over = False
        self.channel.hello_extra = lambda: {"schedules": self.scheduler.digests()}
        if handover is not None:
            # a new build taking over: name the update in the handshake, then tell the old agent
            self.channel.hello_once = {"handover": handover[0]}

    def _system_cmds(self) -> dict[str, Plugin]:
        """What serves each of the vocabulary's system words: all of them, and only them (a word
        added on one side alone stops every agent start, so no test can miss it)."""
        served: dict[str, Plugin] = {
            vocab.PLUGIN_INSTALL: self._install_plugin, vocab.PLUGIN_REMOVE: self._remove_plugin,
            vocab.PLUGINS: self._list_plugins, vocab.UPDATE: self.updater.update,
            vocab.SCHEDULE_SET: self.scheduler.set, vocab.SCHEDULE_CANCEL: self.scheduler.cancel,
            vocab.SCHEDULES: self.scheduler.listing, vocab.RELEASE_FETCH: self.releases.fetch,
            vocab.RELEASE_PLACE: self.releases.place, vocab.RELEASE_ROLLBACK: self.releases.rollback,
        }
        if set(served) != set(vocab.SYSTEM_CMDS):
            raise RuntimeError(f"the agent serves system cmds {sorted(served)}, the vocabulary has "
                               f"{sorted(vocab.SYSTEM_CMDS)}")
        return served

    # -- AgentServices (agent.services): what releases, schedules and the updater are lent ----
    @property
    def uuid(self) -> str:
        return self.ident.uuid

    @property
    def state_root(self) -> Path:
        return self.state.root

    @property
    def task_group(self) -> TaskGroup | None:
        return self._tg

    def emit(self, msgs: list[Message]) -> None:
        self.spool.append([self._signed(m) for m in msgs])
        self._wake.set()

    def emit_text(self, task: Task, stream: str, text: str) -> None:
        self.executor.emit_text(task, stream, text)

    def _connected(self) -> None:
        """After each accepted handshake: the release tracker hears again what we serve. After
        the first one of a new build in an update: take over (step 5)."""
        self.releases.reconnected()
        if self.handover is not None and self._tg is not None and not self._took_over:
            self._took_over = True
            self._tg.start_soon(self.updater.take_over)

    # -- plugin management (system commands, signed by the master like any task) --------------
    async def _install_plugin(self, task: Task) -> tuple[str, int | None]:
        try:
            task.result = await self.plugins.install(task.args)
        except InstallError as exc:
            raise TaskFailed(str(exc)) from None
        return TaskStatus.OK, 0

    async def _remove_plugin(self, task: Task) -> tuple[str, int | None]:
        try:
            task.result = await self.plugins.remove(str(task.args.get("name")))
        except InstallError as exc:
            raise TaskFailed(str(exc)) from None
        return TaskStatus.OK, 0

    async def _list_plugins(self, task: Task) -> tuple[str, int | None]:
        builtin = sorted(c for c in self.executor.plugins if not c.startswith("zy."))
        task.result = {"plugins": self.plugins.listing(builtin)}
        return TaskStatus.OK, 0

    def _outbox(self, last_id: int) -> list[tuple[int, bytes]]:
        return self.spool.pending_after(last_id, max_bytes=2 * 1024 * 1024)

    def _finish(self, taskid: str, msgs: list[Message]) -> None:
        self.spool.finish(taskid, [self._signed(m) for m in msgs])
        self._wake.set()

    def _signed(self, msg: Message) -> dict[str, Any]:
        return msg.signed_wire(self.key)

    def _current_wake(self) -> anyio.Event:
        if self._wake.is_set():
            self._wake = anyio.Event()
        return self._wake

    def _on_message(self, env: dict[str, Any]) -> None:
        kind = env["t"]
        if kind != "hb" and (env.get("uuid") != self.ident.uuid or not verify(self.key, env)):
            # altered, forged or meant for another agent: whoever relayed it is not trusted
            log.warning("rejected a %r message for task %r: bad MAC", kind, env.get("taskid"))
            if kind == "task" and env.get("uuid") == self.ident.uuid and isinstance(env.get("taskid"), str):
                self.executor.refuse(env["taskid"], str(env.get("cmd", "")),
                                     "refused: the command's MAC does not verify (altered or forged on the way)")
            return
        try:
            msg = parse(env, DOWN)
        except MessageError as exc:
            log.warning("ignoring a malformed %r message for task %r: %s", kind, env.get("taskid"), exc.reason)
            return
        if isinstance(msg, TaskMessage) and self._tg is not None:
            self.executor.submit(msg, self._tg)
        elif isinstance(msg, Cancel):
            if msg.taskid in self.executor.running:
                self.executor.cancel(msg.taskid)
            else:  # the old build may run it, finishing before it hands over: it looks there
                self.spool.pass_cancel(msg.taskid)
        elif isinstance(msg, Ack):
            self.spool.ack(msg.ids)

    async def run(self, handle_signals: bool = True) -> None:
        """Serve until stopped. ``handle_signals=False`` leaves SIGINT/SIGTERM to the caller
        (a swarm runs many agents in one process)."""
        watch_children_by_pidfd()
        if self.handover is None:  # a new build must not touch the tasks the old one still runs
            self.executor.recover(self.spool.interrupted())
        self.spool.forget_before(time.time() - 30 * 86400)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self.worker.tg = tg
                await self.scheduler.run(tg)
                if self.handover is None:
                    notify("READY=1")  # at start, not at first connect: a master outage must not fail the unit
                if handle_signals:
                    tg.start_soon(self._signals, tg)
                await self.channel.run_forever()
        except BaseExceptionGroup as group:
            rejected = group.subgroup(Rejected)
            if rejected is not None:
                raise rejected.exceptions[0] from None
            raise
        finally:
            self.worker.kill("the agent is stopping")
            self.spool.close()

    async def _signals(self, tg: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if signum == signal.SIGTERM and self.updater.took_over():
                    # concurrently: another SIGTERM during the drain still stops this agent
                    tg.start_soon(self.updater.hand_over, tg)
                    continue
                log.info("stopping: cancelling running tasks")
                await self.executor.shutdown()
                with anyio.move_on_after(5):
                    while self.executor.running:  # noqa: ASYNC110 - tasks end in many places
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
                return
