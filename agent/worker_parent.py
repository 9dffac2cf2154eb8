"""The agent's side of the plugin worker (what runs inside it is ``worker_child``): starts it
when a plugin task comes, routes its replies to the tasks waiting for them, and replaces it
when it dies, hangs or grows too big.

Whatever goes wrong in the worker ends the tasks that were in it as ``error`` with the reason;
the agent's own process and connection are never touched. An idle worker exits after a while,
so an agent that runs no plugins pays nothing for them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

log = logging.getLogger("zy.agent.worker")
MAX_LINE = 16 * 1024 * 1024


def launcher() -> list[str]:
    """The command that starts this agent program again, in whatever form it was installed:
    a one-file build, a zipapp, or the package in a Python environment."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    main = sys.modules.get("__main__")
    archive = getattr(getattr(main, "__loader__", None), "archive", None)
    if archive:
        # the interpreter's own flags too (`python3 -I zy-agent.pyz`): the worker sees what we see
        head = sys.orig_argv[1:sys.orig_argv.index(archive)] if archive in sys.orig_argv else []
        return [sys.executable, *[flag for flag in head if flag.startswith("-")], archive]
    return [sys.executable, "-m", "agent"]


class WorkerGone(Exception):
    """The worker ended while a request was in it; the message says why."""


class WorkerProcess:
    def __init__(self, uuid: str, memory_limit_mib: int = 512, idle_exit: float = 300.0,
                 command: Callable[[], list[str]] = launcher, stop_grace: float = 3.0) -> None:
        self.uuid = uuid
        self.stop_grace = stop_grace
        self.memory_limit = memory_limit_mib * 1024 * 1024
        self.idle_exit = idle_exit
        self.command = command
        self.tg: TaskGroup | None = None
        self.restarts = 0
        self._proc: Process | None = None
        #: request id -> where its replies go, and the worker process it was sent to
        self._waiting: dict[str, tuple[MemoryObjectSendStream[dict[str, Any]], Process]] = {}
        self._starting = anyio.Lock()
        #: why a worker was killed, by pid (it outlives the kill until it is reaped)
        self._reasons: dict[int, str] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def request(self, req: dict[str, Any], on_reply: Callable[[dict[str, Any]], bool],
                      timeout: float | None = None) -> None:
        """Send ``req`` and feed its replies to ``on_reply`` until it returns True (the last
        one). Raises :class:`WorkerGone` if the worker dies first."""
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](10_000)
        rid = req["id"]
        try:
            proc = await self._ensure()
            self._waiting[rid] = (send, proc)
            await self._write(proc, req)
            try:
                with anyio.fail_after(timeout):
                    async for reply in receive:
                        if reply.get("k") == "gone":
                            raise WorkerGone(reply["reason"])
                        if on_reply(reply):
                            return
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await self._stop(proc, rid, receive)
                raise
            raise WorkerGone("the plugin worker closed its replies")
        finally:
            if self._waiting.get(rid, (None, None))[0] is send:
                del self._waiting[rid]
            send.close()
            receive.close()

    async def _stop(self, proc: Process, rid: str, receive: Any) -> None:
        """A task was cancelled or timed out: ask the plugin to stop; a plugin that does not
        within ``stop_grace`` seconds hangs, and only a new worker gets rid of it."""
        try:
            await self._write(proc, {"op": "cancel", "id": rid})
        except WorkerGone:
            return
        with anyio.move_on_after(self.stop_grace):
            async for reply in receive:
                if reply.get("k") in ("done", "gone"):
                    return
        self.kill(f"the plugin worker was restarted: task {rid} did not stop within {self.stop_grace:g}s "
                  "of being cancelled", proc)

    def kill(self, reason: str, proc: Process | None = None) -> None:
        """Stop the worker (``proc``, by default the current one) now: every request in it ends
        with ``reason``; the next request starts a new worker."""
        proc = proc or self._proc
        if proc is None or proc.returncode is not None:
            return
        self._reasons.setdefault(proc.pid, reason)
        if self._proc is proc:
            self._proc = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def _write(self, proc: Process, req: dict[str, Any]) -> None:
        assert proc.stdin is not None
        try:
            await proc.stdin.send(json.dumps(req, separators=(",", ":")).encode() + b"\n")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise WorkerGone("the plugin worker is not accepting work (it just ended)") from None

    async def _ensure(self) -> Process:
        async with self._starting:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            if self.tg is None:
                raise WorkerGone("the agent is not running")
            env = {**os.environ, "ZY_UUID": self.uuid}
            proc = await anyio.open_process([*self.command(), "--zy-worker"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=None, env=env, start_new_session=True)
            self._proc = proc
            self.tg.start_soon(self._read, proc)
            self.tg.start_soon(self._watch, proc)
            log.info("plugin worker started (pid %d)", proc.pid)
            return proc

    async def _read(self, proc: Process) -> None:
        assert proc.stdout is not None
        stream = BufferedByteReceiveStream(proc.stdout)
        try:
            while True:
                line = await stream.receive_until(b"\n", MAX_LINE)
                try:
                    reply = json.loads(line)
                    target, owner = self._waiting.get(str(reply.get("id")), (None, None))
                except (ValueError, AttributeError):
                    continue
                if target is not None and owner is proc:
                    try:
                        target.send_nowait(reply)
                    except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError,
                anyio.DelimiterNotFound):
            pass
        finally:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(2):
                    await proc.wait()  # it closed its output because it is ending: learn how
                self.kill("the plugin worker stopped answering", proc)
                code = await proc.wait()
                reason = self._reasons.pop(proc.pid, None) or _exit_reason(code)
                if self._proc is proc:
                    self._proc = None
                self.restarts += 1
                mine = [target for target, owner in list(self._waiting.values()) if owner is proc]
                if mine:
                    log.warning("plugin worker %d ended: %s", proc.pid, reason)
                for target in mine:
                    try:
                        target.send_nowait({"k": "gone", "reason": reason})
                    except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass

    async def _watch(self, proc: Process) -> None:
        """Kill the worker when it outgrows its memory limit, or when it has been idle long."""
        idle_since = anyio.current_time()
        while proc.returncode is None and self._proc is proc:
            await anyio.sleep(1.0)
            rss = _rss(proc.pid)
            if rss > self.memory_limit:
                self.kill(f"the plugin worker used {rss / 2**20:.0f} MiB, over its limit of "
                          f"{self.memory_limit / 2**20:.0f} MiB (a plugin leaks or loads too much)", proc)
            if any(owner is proc for _, owner in self._waiting.values()):
                idle_since = anyio.current_time()
            elif anyio.current_time() - idle_since > self.idle_exit:
                self.kill("idle", proc)
                return

    async def aclose(self) -> None:
        self.kill("the agent is stopping")


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the plugin worker died ({name})"
    return f"the plugin worker exited with code {code}"
