"""Online self-update with a graceful handover (``zy.update``), on the old agent's side:

1. the master's signed command names the build by SHA-256;
2. this agent fetches it (from the master, through its proxies), checks the hash, installs it
   beside itself and starts it with ``--handover TASKID:PID``;
3. the new agent handshakes as the same uuid, naming the update; if it exits or has not taken
   over within ``handover_timeout``, this agent kills it, removes the build and carries on, and
   the update ends ``failed`` with the reason;
4. the master sends new commands to the new agent from then on; this one keeps its uplink;
5. the new agent sends this one SIGTERM (see :meth:`Agent._signals`): it takes no more work and
   waits for its running tasks;
6. it reports their results, ends its uplink and exits.

Task messages that arrive while the new build starts are held unclaimed: on success the master
redelivers them to the new agent, on failure they run here. Both agents share the state
directory's spool, which claims each taskid once, so nothing runs twice and nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from hcsdk._http import error_message
from hcsdk._version import __version__

from .executor import Task, TaskFailed
from .plugins.api import Arg, validate

if TYPE_CHECKING:
    from .core import Agent

log = logging.getLogger("zy.agent.update")

UPDATE_ARGS = {
    "sha256": Arg(str, min=64, max=64, help="SHA-256 of the build, from the master's signed command"),
    "size": Arg(int, min=1),
    "filename": Arg(str, default="zy-agent", min=1, max=100),
    "handover_timeout": Arg(float, default=60.0, min=1, max=3600),
}


class Updater:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        #: set by SIGTERM from the new agent while an update waits for it (step 5)
        self.confirmed: anyio.Event | None = None

    @property
    def pending(self) -> bool:
        return self.confirmed is not None and not self.confirmed.is_set()

    async def update(self, task: Task) -> tuple[str, int | None]:
        args = validate(UPDATE_ARGS, task.args)
        if self.confirmed is not None:
            raise TaskFailed("an update of this agent is already in progress", status="failed")
        build = await self._fetch(args["sha256"], args["size"], args["filename"])
        executor = self.agent.executor
        executor.hold = []
        held_from = time.time()
        self.confirmed = confirmed = anyio.Event()
        proc = None
        try:
            proc = await self._start(build, task.taskid)
            reason = await self._wait(proc, confirmed, args["handover_timeout"])
        except BaseException as exc:
            self._abort(proc, build, str(exc) if isinstance(exc, TaskFailed) else "the update was interrupted")
            raise
        if reason is not None:
            self._abort(proc, build, reason)
            raise TaskFailed(f"update failed: {reason}; the old agent carries on", status="failed")
        task.result = {"version_before": __version__, "sha256": args["sha256"], "new_pid": proc.pid,
                       "switch_began": held_from}
        return "ok", 0

    async def _fetch(self, sha: str, size: int, filename: str) -> Path:
        channel = self.agent.channel
        if Path(filename).name != filename or filename.startswith("."):
            raise TaskFailed(f"args.filename {filename!r} must be a plain file name", status="failed")
        try:
            resp = await channel.request("GET", f"/v1/blob?sha256={sha}&sid={channel.sid or ''}", timeout=600.0)
        except Exception as exc:
            raise TaskFailed(f"cannot fetch the build: {exc}", status="failed") from None
        if resp.status_code != 200:
            raise TaskFailed(f"cannot fetch the build ({resp.status_code}): {error_message(resp)}", status="failed")
        data = resp.content
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha or len(data) != size:
            raise TaskFailed(f"the build's SHA-256 is {actual} ({len(data)} bytes), the signed command says {sha} "
                             f"({size} bytes): refused", status="failed")
        home = self.agent.state.root / "builds" / sha[:16]
        home.mkdir(parents=True, exist_ok=True)
        path = home / filename
        tmp = home / f".{filename}.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        tmp.replace(path)
        return path

    async def _start(self, build: Path, taskid: str) -> Any:
        argv = [*build_command(build), *agent_options(), "--handover", f"{taskid}:{os.getpid()}"]
        log.info("starting the new build: %s", " ".join(argv[:2]))
        try:
            # its own session: it must outlive this process, which exits once it hands over
            return await anyio.open_process(argv, stdin=subprocess.DEVNULL, stdout=None, stderr=None,
                                            start_new_session=True)
        except OSError as exc:
            raise TaskFailed(f"cannot start the new build: {exc.strerror or exc}", status="failed") from None

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

    def _abort(self, proc: Any, build: Path, reason: str) -> None:
        """Step 3's failure path: kill the new agent, remove its build, serve on."""
        log.warning("update aborted: %s", reason)
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(build.parent, ignore_errors=True)
        self.confirmed = None
        executor = self.agent.executor
        held, executor.hold = executor.hold or [], None
        # the new agent may have handshaken before it died: be this uuid's channel again
        self.agent.channel.reconnect("an update was aborted")
        if self.agent._tg is not None:
            for msg in held:
                executor.submit(msg, self.agent._tg)


def build_command(build: Path) -> list[str]:
    """How to run a build: an executable (the one-file build) or a zipapp (needs a Python)."""
    with open(build, "rb") as fh:
        head = fh.read(4)
    if head == b"\x7fELF":
        return [str(build)]
    if zipfile.is_zipfile(build):
        python = shutil.which("python3") if getattr(sys, "frozen", False) else sys.executable
        if not python:
            raise TaskFailed("the build is a zipapp and this host has no python3 to run it", status="failed")
        return [python, str(build)]
    raise TaskFailed("the build is neither an executable (ELF) nor a zipapp", status="failed")


def agent_options() -> list[str]:
    """This agent's own options, for the new build (``zy agent OPTIONS`` or ``zy-agent OPTIONS``),
    without a previous ``--handover``."""
    argv = sys.argv[1:]
    if argv[:1] == ["agent"]:
        argv = argv[1:]
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--handover":
            skip = True
        elif not arg.startswith("--handover="):
            out.append(arg)
    return out
