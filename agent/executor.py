"""Runs tasks: checks them, runs the plugin for their cmd word, streams what they produce.

Every task's messages go through ``emit`` (which spools them before they are sent):
``start`` (seq 0), ``out`` chunks (seq 1..n), then one ``done``. They are held back for up to
``HOLD_S`` (or ``HOLD_CHARS`` of output) first, and what is still held when the task ends is
folded into its ``done``: a short task costs one message, one spool commit and one MAC each way
instead of three. (A crash loses nothing acknowledged: a task that was running when the agent
died is reported as interrupted either way.) Commands run in their own session, so a timeout or
a cancel kills the whole process group, not just the shell.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from hcsdk.common import facts as facts_mod
from hcsdk.common.version import __version__
from hcsdk.protocol.args import ArgError
from hcsdk.protocol.messages import Done, Message, Out, Start
from hcsdk.protocol.messages import Task as TaskMessage
from hcsdk.protocol.tasks import FINAL, TaskStatus
from hcsdk.protocol.vocab import validate_args

from .worker_parent import WorkerGone

if TYPE_CHECKING:
    from .plugin_host import PluginHost
    from .worker_parent import WorkerProcess

log = logging.getLogger("zy.agent.exec")

#: sends uplink messages (the agent signs and spools them)
Emit = Callable[[list[Message]], None]
DEFAULT_OUTPUT_CAP = 8 * 1024 * 1024
OUT_PIECE_CHARS = 16 * 1024
#: how long a task's first messages wait to be folded into its done; a longer task's output
#: reaches the master this much later than it was printed
HOLD_S = 0.05
#: output held back beyond this many characters is sent as it is, without waiting
HOLD_CHARS = 64 * 1024
RECOVERY_SEQ = 2**31 - 1  # seq of a "done" written after a restart; never used by a live task
REFUSAL_SEQ = 2**31 - 2  # seq of a "done" reporting a refused (unauthentic) command


@dataclass(eq=False)
class Task:
    taskid: str
    cmd: str
    args: dict[str, Any]
    timeout: float
    seq: int = 0
    #: set when the task is cancelled (its final status, whatever the plugin says)
    status: TaskStatus | None = None
    proc: asyncio.SubprocessTransport | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    truncated: dict[str, bool] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    sent: dict[str, int] = field(default_factory=dict)
    #: a scheduled collection's output, kept here instead of being sent
    sink: list[Message] | None = None
    #: the run's id (None from an older master, and for a scheduled collection)
    run: str | None = None
    #: messages not sent yet (see HOLD_S), their output's length and the timer that sends them
    held: list[Message] = field(default_factory=list)
    held_chars: int = 0
    flush: asyncio.TimerHandle | None = None


class TaskFailed(Exception):
    """A plugin's clear, expected failure: reported as status ``error`` (or ``status``) with
    this message."""

    def __init__(self, message: str, status: str = TaskStatus.ERROR) -> None:
        super().__init__(message)
        self.status = status


class Executor:
    def __init__(self, uuid: str, emit: Emit, claim: Callable[[str, str], bool],
                 finish: Callable[[str, list[Message]], None],
                 hostname: str | None = None, output_cap: int = DEFAULT_OUTPUT_CAP,
                 started: Callable[[str, int], None] | None = None):
        self.uuid = uuid
        self.emit = emit
        self.claim = claim
        self.finish = finish
        self.hostname = hostname
        self.output_cap = output_cap
        self.started = started or (lambda taskid, pgid: None)
        self.running: dict[str, Task] = {}
        self.host: PluginHost | None = None
        #: while an update waits for the new build: task messages wait here, unclaimed
        self.hold: list[TaskMessage] | None = None
        #: False once this agent hands over: the master sends new work to the new build
        self.accepting = True
        self.worker: WorkerProcess | None = None
        self._env: dict[str, str] | None = None
        #: whether the master reads output folded into a done (its handshake says so; an older
        #: master does not, and gets the held messages as they are)
        self.fold: Callable[[], bool] = lambda: True
        self.plugins: dict[str, Callable[[Task], Awaitable[tuple[str, int | None]]]] = {
            "shell": self._shell, "exec": self._exec, "ping": self._ping, "facts": self._facts,
            "echo": self._echo,
        }

    # -- entry points from the channel -------------------------------------------------------
    def submit(self, msg: TaskMessage, tg: TaskGroup) -> None:
        """Run an authentic task message (parsed and MAC-checked by the agent)."""
        if not self.accepting:
            return  # handing over: the master redelivers anything open to the new build
        if self.hold is not None:
            self.hold.append(msg)
            return
        if not self.claim(msg.taskid, msg.cmd):
            return  # already accepted once: its results travel through the spool
        task = Task(taskid=msg.taskid, cmd=msg.cmd, args=msg.args, timeout=float(msg.timeout), run=msg.run)
        reason = msg.refusal(self.uuid, time.time()) or self._unknown(msg.cmd)
        if reason:
            self._done(task, TaskStatus.ERROR, None, time.time(), error=reason)
            return
        self.running[msg.taskid] = task
        tg.start_soon(self._run, task)

    def cancel(self, taskid: str) -> None:
        task = self.running.get(taskid)
        if task and task.status is None:
            task.status = TaskStatus.CANCELLED
            self._kill(task)
            task.scope.cancel()

    def recover(self, interrupted: list[tuple[str, str, int | None, float]]) -> None:
        """Report tasks that were running when the agent stopped: they cannot be resumed.
        Their process groups, if still alive, are killed rather than left orphaned."""
        for taskid, cmd, pgid, received_at in interrupted:
            groups = set(_task_process_groups(self.uuid, taskid))
            if pgid and _started_after(pgid, received_at - 1):
                groups.add(pgid)
            for group in groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            task = Task(taskid=taskid, cmd=cmd, args={}, timeout=0, seq=RECOVERY_SEQ)
            self._done(task, TaskStatus.ERROR, None, None, error="the agent restarted while the task ran")

    def refuse(self, taskid: str, cmd: str, reason: str) -> None:
        """Tell the master a command was refused, without claiming its taskid: a genuine copy
        may still arrive and run."""
        self.emit([Done(uuid=self.uuid, cmd=cmd, taskid=taskid, seq=REFUSAL_SEQ, status=TaskStatus.ERROR,
                        exit_code=None, started_at=None, finished_at=time.time(), truncated={}, error=reason)])

    async def shutdown(self) -> None:
        for task in list(self.running.values()):
            self.cancel(task.taskid)

    # -- the task lifecycle -------------------------------------------------------------------
    def _unknown(self, cmd: str) -> str | None:
        """Why this agent cannot run ``cmd`` (it has no such command), or None."""
        if cmd and not self.knows(cmd):
            known = sorted(set(self.plugins) | (self.host.commands() if self.host else set()))
            return f"unknown cmd {cmd!r} on this agent (known: {', '.join(known)})"
        return None

    def knows(self, cmd: str) -> bool:
        return cmd in self.plugins or (self.host is not None and self.host.plugin_for(cmd) is not None)

    async def _run(self, task: Task) -> None:
        started = time.time()
        self._send(task, Start(uuid=self.uuid, cmd=task.cmd, taskid=task.taskid, seq=task.seq, started_at=started))
        status, code, error = TaskStatus.ERROR, None, None
        try:
            status, code, error = await self._execute(task)
        finally:
            if task.status == TaskStatus.CANCELLED:
                status, error = TaskStatus.CANCELLED, "cancelled on request"
            self.running.pop(task.taskid, None)
            self._done(task, status, code, started, error=error)

    async def _execute(self, task: Task) -> tuple[TaskStatus, int | None, str | None]:
        """Run the task's plugin within its timeout: (status, exit code, error)."""
        status, code, error = TaskStatus.ERROR, None, None
        try:
            with task.scope:
                with anyio.move_on_after(task.timeout) as deadline:
                    task.args = validate_args(task.cmd, task.args)  # a plugin's are checked in the worker
                    said, code = await self.plugins.get(task.cmd, self._in_worker)(task)
                    status = _status(said)
                if deadline.cancelled_caught:
                    status = TaskStatus.TIMEOUT
                    error = f"killed after the {task.timeout:g}s timeout"
        except TaskFailed as exc:
            status, error = _status(exc.status), str(exc)
        except ArgError as exc:
            error = str(exc)
        except Exception as exc:  # a plugin bug must not take the agent down
            log.exception("task %s failed", task.taskid)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._kill(task)
        return status, code, error

    async def collect(self, taskid: str, cmd: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run a command for a scheduled collection: what it prints and returns comes back here
        (to become one sample) instead of going to the master as task events."""
        task = Task(taskid=taskid, cmd=cmd, args=dict(args), timeout=timeout, sink=[])
        if not self.knows(cmd):
            return {"status": TaskStatus.ERROR, "exit_code": None, "error": f"unknown cmd {cmd!r} on this agent",
                    "stdout": "", "stderr": "", "result": None}
        status, code, error = await self._execute(task)
        text = {"stdout": "", "stderr": ""}
        for msg in task.sink or []:
            if isinstance(msg, Out) and msg.stream in text:
                text[msg.stream] += msg.data
        return {"status": status, "exit_code": code, "error": error, "result": task.result, **text}

    def _send(self, task: Task, msg: Message) -> None:
        """One of the task's messages (numbered ``task.seq``): held for the master (see HOLD_S), or
        kept for a collection."""
        task.seq += 1
        if task.sink is not None:
            task.sink.append(msg)
            return
        task.held.append(msg)
        if isinstance(msg, Out):
            task.held_chars += len(msg.data)
        if task.held_chars > HOLD_CHARS:
            self._flush(task)
        elif task.flush is None:
            task.flush = asyncio.get_running_loop().call_later(HOLD_S, self._flush, task)

    def _flush(self, task: Task) -> None:
        """Send what the task holds, as it is."""
        held = self._take_held(task)
        if held:
            self.emit(held)

    @staticmethod
    def _take_held(task: Task) -> list[Message]:
        """What the task still holds, now the caller's to send; its timer stopped."""
        if task.flush is not None:
            task.flush.cancel()
            task.flush = None
        held, task.held, task.held_chars = task.held, [], 0
        return held

    def _out(self, task: Task, stream: str, data: str) -> None:
        self._send(task, Out(uuid=self.uuid, cmd=task.cmd, taskid=task.taskid, seq=task.seq, stream=stream, data=data))

    def _done(self, task: Task, status: TaskStatus, code: int | None, started: float | None,
              error: str | None) -> None:
        """The task's final message, with what it still holds: folded in when the master reads
        folded dones (``fold``), else spooled before it in the same commit. A held start is
        dropped when folding: the done carries started_at."""
        held, folded = self._take_held(task), []
        if self.fold():
            folded, held = [[m.stream, m.data] for m in held if isinstance(m, Out)], []
        msg = Done(uuid=self.uuid, cmd=task.cmd, taskid=task.taskid, seq=task.seq, status=status, exit_code=code,
                   started_at=started, finished_at=time.time(), truncated=task.truncated, error=error,
                   result=task.result, out=folded)
        task.seq += 1
        try:
            self.finish(task.taskid, [*held, msg])
        except (ValueError, TypeError) as exc:  # FrameError too: a result too big or not JSON
            failed = replace(msg, status=TaskStatus.ERROR, result=None,
                             error=f"the task's result cannot be sent: {exc}")
            try:
                self.finish(task.taskid, [*held, failed])
            except (ValueError, TypeError):  # the output itself (not JSON): the verdict still goes
                self.finish(task.taskid, [replace(failed, out=[])])

    @staticmethod
    def _kill(task: Task) -> None:
        if task.proc is not None and task.proc.get_returncode() is None:
            try:
                os.killpg(task.proc.get_pid(), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # -- built-in plugins -------------------------------------------------------------------
    async def _shell(self, task: Task) -> tuple[str, int | None]:
        return await self._process(task, [task.args["shell"], "-c", task.args["script"]])

    async def _exec(self, task: Task) -> tuple[str, int | None]:
        return await self._process(task, task.args["argv"])

    async def _in_worker(self, task: Task) -> tuple[str, int | None]:
        """A plugin command, run in the worker process (see ``worker_parent``)."""
        ref = self.host.plugin_for(task.cmd) if self.host else None
        if ref is None or self.worker is None:
            raise TaskFailed(f"cmd {task.cmd!r} is no longer installed on this agent")
        final: dict[str, Any] = {}

        def on_reply(reply: dict[str, Any]) -> bool:
            if reply.get("k") == "out":
                self._capped_text(task, str(reply.get("stream")), str(reply.get("data", "")))
                return False
            final.update(reply)
            return reply.get("k") == "done"

        req = {"op": "run", "id": task.taskid, "cmd": task.cmd, "args": task.args, "uuid": self.uuid,
               **ref.request()}
        try:
            await self.worker.request(req, on_reply)
        except WorkerGone as exc:
            raise TaskFailed(f"{exc}; the task was lost with it (the worker restarts for the next task)") from None
        if final.get("status") != TaskStatus.OK:
            raise TaskFailed(str(final.get("error") or "the plugin failed"))
        task.result = final.get("result")
        return TaskStatus.OK, 0

    def _capped_text(self, task: Task, stream: str, text: str) -> None:
        stream = "stderr" if stream == "stderr" else "stdout"
        sent = task.sent.get(stream, 0)
        if sent + len(text) > self.output_cap:
            text, task.truncated[stream] = text[: max(0, self.output_cap - sent)], True
        task.sent[stream] = sent + len(text)
        self.emit_text(task, stream, text)

    async def _ping(self, task: Task) -> tuple[str, int | None]:
        self._out(task, "stdout", "pong\n")
        return TaskStatus.OK, 0

    async def _echo(self, task: Task) -> tuple[str, int | None]:
        """Answers in-process: measures the channel, not fork and exec."""
        self._out(task, "stdout", task.args["text"] + "\n")
        return TaskStatus.OK, 0

    async def _facts(self, task: Task) -> tuple[str, int | None]:
        import json

        self.emit_text(task, "stdout", json.dumps(facts_mod.collect(self.hostname)) + "\n")
        return TaskStatus.OK, 0

    def _environ(self) -> dict[str, str]:
        """What every command's environment starts from: the agent's own, and who runs it. Built
        once (copying os.environ decodes every variable: a twentieth of a shell task's CPU)."""
        if self._env is None:
            self._env = {**os.environ, "ZY_UUID": self.uuid, "ZY_HOSTNAME": self.hostname or socket.gethostname(),
                         "ZY_AGENT_PID": str(os.getpid()), "ZY_AGENT_VERSION": __version__}
        return self._env

    async def _process(self, task: Task, argv: list[str]) -> tuple[str, int | None]:
        env = {**self._environ(), "ZY_TASKID": task.taskid}
        if task.run is not None:
            env["ZY_RUN_ID"] = task.run
        loop = asyncio.get_running_loop()
        output = _Output(self, task, loop)
        try:
            transport, _ = await loop.subprocess_exec(lambda: output, *argv, stdin=_devnull(), stdout=subprocess.PIPE,
                                                      stderr=subprocess.PIPE, start_new_session=True, env=env)
        except OSError as exc:
            raise TaskFailed(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        task.proc = transport
        self.started(task.taskid, transport.get_pid())
        try:
            await asyncio.shield(output.exited)
            # a background child may hold the pipes open: read on briefly, then stop
            with anyio.move_on_after(1.0):
                await asyncio.shield(output.drained)
        finally:
            self._kill(task)
            transport.close()
        code = transport.get_returncode()
        return (TaskStatus.OK if code == 0 else TaskStatus.FAILED), code

    def emit_text(self, task: Task, stream: str, text: str) -> None:
        """``text`` as the task's output on ``stream`` (a collection keeps it, others send it)."""
        # JSON can grow a character to six bytes (\u0000): pieces this size always fit a frame
        for i in range(0, len(text), OUT_PIECE_CHARS):
            self._out(task, stream, text[i : i + OUT_PIECE_CHARS])


class _Output(asyncio.SubprocessProtocol):
    """A command's stdout and stderr, decoded and capped as they arrive, straight into its
    messages: a protocol rather than anyio's process streams, whose wrappers, reader tasks and
    task group were a tenth of the agent's CPU per shell task. A pipe past its cap is still read
    (and dropped), so the command never blocks on a full pipe."""

    def __init__(self, executor: Executor, task: Task, loop: asyncio.AbstractEventLoop) -> None:
        self.executor, self.task = executor, task
        self.decoders = {1: codecs.getincrementaldecoder("utf-8")(errors="replace"),
                         2: codecs.getincrementaldecoder("utf-8")(errors="replace")}
        self.sent = {1: 0, 2: 0}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()  # both pipes closed

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        name = "stderr" if fd == 2 else "stdout"
        chunk = data.encode() if isinstance(data, str) else data
        room = self.executor.output_cap - self.sent[fd]
        if len(chunk) > room:
            chunk, self.task.truncated[name] = chunk[:max(0, room)], True
        if chunk:
            self.sent[fd] += len(chunk)
            self.executor.emit_text(self.task, name, self.decoders[fd].decode(chunk))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in self.decoders:
            self.executor.emit_text(self.task, "stderr" if fd == 2 else "stdout",
                                    self.decoders.pop(fd).decode(b"", final=True))
        if not self.decoders and not self.drained.done():
            self.drained.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


_DEVNULL: list[int] = []


def _devnull() -> int:
    """One read-only /dev/null for every command's stdin (subprocess.DEVNULL opens one per
    command), opened at first use and kept (close-on-exec: only the child's stdin copy survives)."""
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    return _DEVNULL[0]


def _status(said: str) -> TaskStatus:
    """A plugin's final status as the protocol spells it; one that is not a final status is the
    agent's bug, reported as ``error`` rather than sent as a message the master refuses."""
    try:
        status = TaskStatus(said)
    except ValueError:
        return TaskStatus.ERROR
    return status if status in FINAL else TaskStatus.ERROR


def _task_process_groups(uuid: str, taskid: str) -> list[int]:
    """Process groups of processes started for this task: they carry ZY_UUID and ZY_TASKID in
    their environment (found even when the agent died before it could note their pid)."""
    marks = (f"ZY_UUID={uuid}".encode(), f"ZY_TASKID={taskid}".encode())
    groups = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            if all(mark in env for mark in marks):
                groups.append(os.getpgid(int(entry)))
        except (OSError, ProcessLookupError):
            continue
    return groups


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` exists and started after ``when`` (so a reused pid is spared)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return boot + start_ticks / os.sysconf("SC_CLK_TCK") >= when
