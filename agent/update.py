"""Online self-update with a graceful handover (``zy.update``):

1. the master's signed command names the build by SHA-256;
2. the old agent fetches it (from the master, through its proxies), checks the hash, installs it
   beside itself (``<state>/builds/``) and starts it with ``--handover TASKID:PID``; from then
   on it holds new task messages, unclaimed;
3. the new agent handshakes as the same uuid, naming the update; if it exits or has not taken
   over within ``handover_timeout``, the old one kills it, removes the build, runs the held
   tasks and carries on, and the update ends ``failed`` with the reason;
4. the master sends new commands to the new agent from then on; the old keeps its uplink;
5. once connected for ``SETTLE`` seconds, the new agent records that it took over
   (``<state>/handover.json``), makes itself the current build, and sends the old one SIGTERM:
   the old one takes no more work and waits for its running tasks (a SIGTERM without that
   record is an ordinary stop, which also abandons the update);
6. the old agent reports their results over its uplink; if the new agent is still alive it ends
   the uplink and exits, and the update is ``ok``; if it died meanwhile, the old agent takes
   the channel back and the update is ``failed``;
7. the inventory shows the new version.

Both agents share the spool, which claims each taskid once: nothing runs twice, nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from hcsdk.common.files import atomic_open_async
from hcsdk.common.version import __version__
from hcsdk.net.http import error_message
from hcsdk.protocol.tasks import TaskStatus

from . import builds
from .executor import Task, TaskFailed
from .jsonfile import write_json
from .plugins.api import Arg, validate
from .systemd import notify

if TYPE_CHECKING:
    from .scheduler import Scheduler
    from .services import AgentServices

log = logging.getLogger("zy.agent.update")

UPDATE_ARGS = {
    "sha256": Arg(str, min=64, max=64, help="SHA-256 of the build, from the master's signed command"),
    "size": Arg(int, min=1),
    "filename": Arg(str, default="zy-agent", min=1, max=100),
    "handover_timeout": Arg(float, default=60.0, min=1, max=3600),
}
#: how long the new agent stays connected before it tells the old one to go
SETTLE = 2.0


class NewBuild:
    """The new build's process. A plain Popen, not an asyncio subprocess: an asyncio subprocess
    transport kills its process when it is collected, and with the pidfd child watcher (whose
    callbacks are dropped as the loop closes) that happened as this agent exited, taking the
    new build with it."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        while (code := self._popen.poll()) is None:  # noqa: ASYNC110 - no watcher: polled, ten times a second
            await anyio.sleep(0.1)
        return code


class Updater:
    def __init__(self, services: AgentServices, scheduler: Scheduler, handover: tuple[str, int] | None = None) -> None:
        self.services = services
        #: paused while this agent hands over, resumed if the new build dies after taking over
        self.scheduler = scheduler
        self.root = services.state_root
        #: on a new agent: (the update's taskid, the old agent's pid)
        self.handover = handover
        self.busy = False
        #: set when the new agent has taken over (SIGTERM with its record)
        self.confirmed: anyio.Event | None = None
        self.proc: Any = None
        self.taskid = ""
        #: set by the drain with None (the new agent lives on) or why it did not
        self.outcome: str | None = None
        self.drained = anyio.Event()

    @property
    def pending(self) -> bool:
        return self.confirmed is not None and not self.confirmed.is_set()

    # -- the old agent: steps 2, 3 and 6 -------------------------------------------------------
    async def update(self, task: Task) -> tuple[str, int | None]:
        args = validate(UPDATE_ARGS, task.args)
        if self.busy:
            raise TaskFailed("an update of this agent is already in progress", status=TaskStatus.FAILED)
        self.busy = True
        try:
            return await self._update(task, args)
        finally:
            self.busy = False

    async def _update(self, task: Task, args: dict[str, Any]) -> tuple[str, int | None]:
        build = await self._fetch(args["sha256"], args["size"], args["filename"])
        self.services.executor.hold = []
        held_from = time.time()
        self.confirmed, self.taskid, self.outcome, self.drained = anyio.Event(), task.taskid, None, anyio.Event()
        self.proc = None
        previous = builds.read_current(self.root)
        try:
            self.proc = await self._start(build, task.taskid)
            reason = await self._wait(self.proc, self.confirmed, args["handover_timeout"])
        except BaseException as exc:
            self._abort(build, str(exc) if isinstance(exc, TaskFailed) else "the update was interrupted")
            raise
        if reason is not None:
            self._abort(build, reason)
            raise TaskFailed(f"update failed: {reason}; the old agent carries on", status=TaskStatus.FAILED)
        await self.drained.wait()
        if self.outcome is not None:
            builds.restore_current(self.root, previous)
            self._abort(build, self.outcome, reconnect=False)
            raise TaskFailed(f"update failed: {self.outcome}; the old agent took its channel back",
                             status=TaskStatus.FAILED)
        task.result = {"version_before": __version__, "sha256": args["sha256"], "new_pid": self.proc.pid,
                       "switch_began": held_from}
        return TaskStatus.OK, 0

    async def _fetch(self, sha: str, size: int, filename: str) -> Path:
        """Download the build to disk as it arrives, hashing it on the way: a build is never
        held whole in memory (it may be hundreds of MiB), and one longer than the signed size
        is cut off there."""
        import httpx

        channel = self.services.channel
        if Path(filename).name != filename or filename.startswith("."):
            raise TaskFailed(f"args.filename {filename!r} must be a plain file name", status=TaskStatus.FAILED)
        if channel.url is None:
            raise TaskFailed("cannot fetch the build: the agent has no channel right now", status=TaskStatus.FAILED)
        home = self.root / "builds" / sha[:16]
        home.mkdir(parents=True, exist_ok=True)
        path = home / filename
        digest, got = hashlib.sha256(), 0
        try:
            # the build lands whole or not at all: the temp file is renamed only once its hash and
            # size are those signed (a TaskFailed inside the block removes it)
            async with atomic_open_async(path, mode=0o755, prefix=f".{filename}.") as fh:
                os.fchmod(fh.wrapped.fileno(), 0o755)  # exactly, whatever the umask (an executable)
                # HTTP/1.1 connections of its own, as Channel.bulk_request uses; the session id in
                # a header, never in a URL that lands in access logs
                async with channel.stream_client(connections=1) as client, client.stream(
                        "GET", f"{channel.url}/v1/blob", params={"sha256": sha},
                        headers={"x-zy-sid": channel.sid or ""},
                        timeout=httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=10.0)) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise TaskFailed(f"cannot fetch the build ({resp.status_code}): {error_message(resp)}",
                                         status=TaskStatus.FAILED)
                    async for chunk in resp.aiter_bytes(256 * 1024):
                        got += len(chunk)
                        if got > size:
                            break
                        digest.update(chunk)
                        await fh.write(chunk)
                actual = digest.hexdigest()
                if actual != sha or got != size:
                    raise TaskFailed(f"the build's SHA-256 is {actual} ({got}{'+' if got > size else ''} bytes), "
                                     f"the signed command says {sha} ({size} bytes): refused",
                                     status=TaskStatus.FAILED)
        except httpx.HTTPError as exc:
            raise TaskFailed(f"cannot fetch the build: {exc or type(exc).__name__}", status=TaskStatus.FAILED) from None
        return path

    async def _start(self, build: Path, taskid: str) -> NewBuild:
        try:
            argv = [*builds.build_command(build), *builds.agent_options(), "--handover", f"{taskid}:{os.getpid()}"]
        except builds.BuildError as exc:
            raise TaskFailed(str(exc), status=TaskStatus.FAILED) from None
        log.info("starting the new build: %s", " ".join(argv[:2]))
        (self.root / "handover.json").unlink(missing_ok=True)
        try:
            # its own session: it must outlive this process, which exits once it hands over
            # (a spawn returns at once; see NewBuild for why this is not an asyncio subprocess)
            return NewBuild(subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True))  # noqa: ASYNC220
        except OSError as exc:
            raise TaskFailed(f"cannot start the new build: {exc.strerror or exc}", status=TaskStatus.FAILED) from None

    async def _wait(self, proc: Any, confirmed: anyio.Event, timeout: float) -> str | None:
        """None once the new agent has taken over; else why it did not."""
        reason: str | None = f"the new agent did not take over within {timeout:g}s"
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                async def exited() -> None:
                    nonlocal reason
                    code = await proc.wait()
                    reason = f"the new agent exited with code {code} before taking over"
                    tg.cancel_scope.cancel()

                tg.start_soon(exited)
                await confirmed.wait()
                reason = None
                tg.cancel_scope.cancel()
        return reason

    def _abort(self, build: Path, reason: str, reconnect: bool = True) -> None:
        """Kill the new agent, remove its build (unless this agent runs from it), serve on."""
        log.warning("update aborted: %s", reason)
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if builds.own_build(self.root) is None or builds.own_build(self.root) != build.resolve():
            shutil.rmtree(build.parent, ignore_errors=True)
        self.confirmed = None
        executor = self.services.executor
        held, executor.hold = executor.hold or [], None
        if reconnect:
            # the new agent may have handshaken before it died: be this uuid's channel again
            self.services.channel.reconnect("an update was aborted")
        tg = self.services.task_group
        if tg is not None:
            for msg in held:
                executor.submit(msg, tg)

    def took_over(self) -> bool:
        """Whether a SIGTERM now comes from our new agent (its record names this update and
        its own pid), rather than from an operator stopping the service."""
        try:
            record = json.loads((self.root / "handover.json").read_text())
        except (OSError, ValueError):
            return False
        return (self.pending and self.proc is not None and self.proc.returncode is None
                and record.get("taskid") == self.taskid and record.get("pid") == self.proc.pid)

    async def hand_over(self, tg: TaskGroup) -> None:
        """Steps 5 and 6: take no more work, let running tasks finish and report them; exit if
        the new agent lives on, else take the channel back."""
        services, executor = self.services, self.services.executor
        assert self.confirmed is not None
        log.info("handing over to the new build: finishing %d running task(s)", len(executor.running) - 1)
        services.channel.retire()
        self.scheduler.stop()
        executor.accepting, executor.hold = False, None
        self.confirmed.set()
        others = set(executor.running) - {self.taskid}
        while set(executor.running) - {self.taskid}:
            for taskid in services.spool.take_cancels():  # cancels the master sent the new build
                executor.cancel(taskid)
            await anyio.sleep(0.1)
        await self._acked(others)
        code = self.proc.returncode
        self.outcome = None if code is None else f"the new agent exited with code {code} after taking over"
        if self.outcome is not None:
            # the master has given this channel back (the new one's ended): serve on
            log.error("%s: serving on", self.outcome)
            executor.accepting = True
            services.channel.resume()
            await self.scheduler.run(tg)
        self.drained.set()
        while self.taskid in executor.running:  # noqa: ASYNC110 - the update task reports now
            await anyio.sleep(0.05)
        await self._acked({self.taskid})
        if self.outcome is None:
            services.channel.finish()
            await anyio.sleep(0.5)  # the end of the uplink reaches the master
            log.info("handed over; exiting")
            tg.cancel_scope.cancel()

    async def _acked(self, taskids: set[str]) -> None:
        with anyio.move_on_after(30):  # past that the new agent sends them: the spool is shared
            while self.services.spool.pending_for(taskids):  # noqa: ASYNC110 - acks arrive on the channel
                await anyio.sleep(0.1)

    # -- the new agent: step 5 -----------------------------------------------------------------
    async def take_over(self) -> None:
        """Once connected for SETTLE seconds (a build that dies at once never takes over), record
        the takeover, become the current build, and tell the old agent to stop taking work."""
        assert self.handover is not None
        taskid, old_pid = self.handover
        channel = self.services.channel
        while True:
            await anyio.sleep(SETTLE)
            if channel.sid is not None:
                break
        write_json(self.root / "handover.json", {"taskid": taskid, "pid": os.getpid()})
        own = builds.own_build(self.root)
        if own is not None:
            builds.record_current(self.root, own)
            builds.prune(self.root, {own} | ({Path(p)} if (p := _parent_build(old_pid)) else set()))
        notify(f"MAINPID={os.getpid()}\nREADY=1")
        if os.getppid() != old_pid:
            log.warning("the old agent (pid %d) is gone already", old_pid)
            return
        try:
            os.kill(old_pid, signal.SIGTERM)
            log.info("took over from the old agent (pid %d)", old_pid)
        except (ProcessLookupError, PermissionError) as exc:
            log.warning("could not signal the old agent (pid %d): %s", old_pid, exc)


def _parent_build(pid: int) -> str | None:
    """The build file the old agent runs from, when it is one (kept as the way back)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            args = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return None
    return next((a for a in args if "/builds/" in a and Path(a).is_file()), None)
