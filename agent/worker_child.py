"""The plugin worker, inside its own process (the agent's side is ``worker_parent``): the
process plugins run in, apart from the agent (``python -m agent --zy-worker``). A plugin that
crashes, hangs or leaks takes this process down, never the agent or its connection; the agent
notices, reports the tasks that were in here, and starts a new one.

It speaks JSON lines: requests on stdin, replies on the file descriptor that was stdout when it
started (plugins' own prints go to stderr, so they cannot corrupt the protocol).

Requests, ``{"op": ..., "id": ...}``:
  ``run``      module, path, pkg, cmd, args, uuid: run the command in a thread of its own
  ``cancel``   set the task's ``ctx.cancelled``
  ``describe`` module, path, pkg: import the plugin and answer its version and commands
Replies, ``{"id": ..., "k": ...}``: ``out`` (stream, data), ``done`` (status ok|error, result,
error), ``described`` (version, cmds).

Each installed version loads under a module name of its own, so a task already running keeps
the code it started with while the next task uses the new one.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
import traceback
from types import ModuleType
from typing import IO, Any

from hcsdk.protocol.tasks import TaskStatus

from .plugins.api import ArgError, CommandSpec, Context, PluginError, check_result, validate


class Worker:
    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._modules: dict[str, ModuleType] = {}
        self._cancels: dict[str, threading.Event] = {}

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def serve(self, lines: IO[bytes]) -> None:
        for line in lines:
            try:
                req = json.loads(line)
                op = req["op"]
            except (ValueError, KeyError, TypeError):
                continue  # the agent never sends this; nothing sensible to answer
            if op == "run":
                self._cancels[req["id"]] = threading.Event()
                threading.Thread(target=self._run, args=(req,), daemon=True, name=req["id"]).start()
            elif op == "cancel":
                event = self._cancels.get(req["id"])
                if event is not None:
                    event.set()
            elif op == "describe":
                self._describe(req)

    def _load(self, req: dict[str, Any]) -> ModuleType:
        name = req["module"]
        with self._lock:
            module = self._modules.get(name)
        if module is not None:
            return module
        if not req.get("path"):
            module = importlib.import_module(name)
        else:
            path = req["path"]
            locations = [os.path.dirname(path)] if req.get("pkg") else None
            spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=locations)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load a plugin from {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # a package's relative imports look it up here
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        with self._lock:
            self._modules[name] = module
        return module

    def _describe(self, req: dict[str, Any]) -> None:
        try:
            module = self._load(req)
            cmds = [spec.describe() for spec in commands(module).values()]
            self.send({"id": req["id"], "k": "described", "version": str(getattr(module, "VERSION", "0")),
                       "cmds": cmds})
        except BaseException as exc:  # an import error must reach the operator, not kill us
            self.send({"id": req["id"], "k": "done", "status": TaskStatus.ERROR,
                       "error": _failure("loading", exc)})

    def _run(self, req: dict[str, Any]) -> None:
        taskid = req["id"]
        status, result, error = TaskStatus.ERROR, None, None
        try:
            spec = commands(self._load(req)).get(req["cmd"])
            if spec is None:
                raise PluginError(f"plugin module {req['module']} has no command {req['cmd']!r}")
            args = validate(spec.args, req.get("args") or {})
            ctx = Context(taskid, req.get("uuid", ""), lambda stream, data: self._out_text(taskid, stream, data),
                          self._cancels[taskid])
            value = spec.func(ctx, **args)
            if value is not None and not isinstance(value, dict):
                raise PluginError(f"{req['cmd']} returned {type(value).__name__}; a plugin returns a dict or None")
            check_result(req["cmd"], value)
            status, result = TaskStatus.OK, value
        except (ArgError, PluginError) as exc:
            error = str(exc)
        except BaseException as exc:
            error = _failure("running", exc)
        finally:
            self._cancels.pop(taskid, None)
        self.send({"id": taskid, "k": "done", "status": status, "result": result, "error": error})

    def _out_text(self, taskid: str, stream: str, data: str) -> None:
        self.send({"id": taskid, "k": "out", "stream": stream, "data": data})


def commands(module: ModuleType) -> dict[str, CommandSpec]:
    """The commands a plugin module declares, by cmd word."""
    found: dict[str, CommandSpec] = {}
    for value in vars(module).values():
        spec = getattr(value, "__zy_command__", None)
        if isinstance(spec, CommandSpec):
            found[spec.cmd] = spec
    return found


def _failure(doing: str, exc: BaseException) -> str:
    """``ValueError: bad thing (plugin.py:12 in parse)``: the innermost frame of the plugin."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    for frame in reversed(frames):
        if "agent/worker_child.py" not in frame.filename.replace(os.sep, "/"):
            where = f" ({os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"
            break
    text = str(exc)
    suffix = " while loading" if doing == "loading" else ""
    return f"{type(exc).__name__}{': ' + text if text else ''}{where}{suffix}"


def main() -> int:
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    Worker(proto).serve(sys.stdin.buffer)
    # stdin closed: the agent is gone or wants us gone; running plugin threads go with us
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
