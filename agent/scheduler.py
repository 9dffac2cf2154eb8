"""Scheduled collection: the agent runs a command every N seconds by itself and sends each run's
outcome as one ``sample`` (``zy.schedule.set`` / ``zy.schedule.cancel`` / ``zy.schedules``).

The agent keeps the schedule (``<state>/schedules.json``), so it survives restarts, and a
disconnect loses no samples: they wait in the spool like any result. Runs are aligned to
multiples of the period on the wall clock, so samples from many agents line up, and a sample's
identity comes from its tick: two copies of the agent (during an online update) collecting the
same tick make one sample, not two.

A sample's fields are what the plugin returned; for a command that only prints, its output as
JSON when it prints a JSON object, ``{"value": n}`` when it prints one number, else
``{"stdout": ...}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from hcsdk.protocol.messages import Sample
from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.vocab import validate_args

from .executor import Task, TaskFailed
from .jsonfile import write_json
from .plugins.api import Arg, ArgError, PluginError, check_result, validate

if TYPE_CHECKING:
    from .services import AgentServices

log = logging.getLogger("zy.agent.schedule")

SCHEDULE_ARGS = {
    "name": Arg(str, min=1, max=64),
    "cmd": Arg(str, min=1, max=64),
    "args": Arg(dict, default={}),
    "every": Arg(float, min=1, max=7 * 86400),
    "timeout": Arg(float, default=0.0, min=0, max=86400),
    #: the master's digest of the schedule, reported back at each handshake
    "digest": Arg(str, default="", max=64),
}
MAX_TEXT = 64 * 1024


class Scheduler:
    def __init__(self, services: AgentServices, path: Path) -> None:
        self.services = services
        self.path = path
        self.schedules: dict[str, dict[str, Any]] = self._load()
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._tg: TaskGroup | None = None

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
            return {k: v for k, v in data.items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            log.error("%s is damaged; starting with no schedules", self.path)
            return {}

    def _save(self) -> None:
        write_json(self.path, self.schedules)

    async def run(self, tg: TaskGroup) -> None:
        self._tg = tg
        for name in self.schedules:
            self._start(name)

    def digests(self) -> dict[str, str]:
        """name -> the master's digest, for the handshake (the master reconciles from it)."""
        return {name: str(spec.get("digest", "")) for name, spec in self.schedules.items()}

    def stop(self) -> None:
        """Stop collecting (an agent that hands over: the new build collects from now on)."""
        for scope in self._scopes.values():
            scope.cancel()
        self._scopes.clear()

    # -- system commands --------------------------------------------------------------------
    async def set(self, task: Task) -> tuple[str, int | None]:
        spec = validate(SCHEDULE_ARGS, task.args)
        if spec["cmd"].startswith("zy.") or not self.services.executor.knows(spec["cmd"]):
            raise TaskFailed(f"cannot schedule cmd {spec['cmd']!r}: this agent has no such command")
        try:  # a built-in's arguments; a plugin's are checked by the worker, at each run
            validate_args(spec["cmd"], spec["args"])
        except ArgError as exc:
            raise TaskFailed(f"cannot schedule {spec['cmd']}: {exc}") from None
        spec["timeout"] = spec["timeout"] or min(spec["every"], 300.0)
        name = spec.pop("name")
        replaced = name in self.schedules
        self.schedules[name] = spec
        self._save()
        self._start(name)
        task.result = {"name": name, "cmd": spec["cmd"], "every": spec["every"], "replaced": replaced}
        return TaskStatus.OK, 0

    async def cancel(self, task: Task) -> tuple[str, int | None]:
        name = str(task.args.get("name"))
        if self.schedules.pop(name, None) is None:
            raise TaskFailed(f"no schedule {name!r} on this agent")
        self._save()
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
        task.result = {"name": name, "cancelled": True}
        return TaskStatus.OK, 0

    async def listing(self, task: Task) -> tuple[str, int | None]:
        task.result = {"schedules": [{"name": n, **s} for n, s in sorted(self.schedules.items())]}
        return TaskStatus.OK, 0

    # -- collecting ---------------------------------------------------------------------------
    def _start(self, name: str) -> None:
        old = self._scopes.pop(name, None)
        if old is not None:
            old.cancel()
        if self._tg is None:
            return  # started with the agent
        scope = anyio.CancelScope()
        self._scopes[name] = scope
        self._tg.start_soon(self._loop, name, self.schedules[name], scope)

    async def _loop(self, name: str, spec: dict[str, Any], scope: anyio.CancelScope) -> None:
        every = float(spec["every"])
        with scope:
            while True:
                tick = math.floor(time.time() / every) * every + every
                await anyio.sleep(max(0.0, tick - time.time()))
                try:
                    await self._collect(name, spec, tick)
                except Exception:  # one bad sample must not end the schedule
                    log.exception("schedule %s: collecting failed", name)

    async def _collect(self, name: str, spec: dict[str, Any], tick: float) -> None:
        day, ms = divmod(int(round(tick * 1000)), 86_400_000)
        taskid = f"sample:{name}:{day}"
        outcome = await self.services.executor.collect(f"{taskid}:{ms}", spec["cmd"], spec.get("args") or {},
                                                       float(spec["timeout"]))
        self.services.emit([Sample(uuid=self.services.uuid, cmd=spec["cmd"], taskid=taskid, seq=ms, series=name,
                                   time=tick, taken_at=time.time(), status=TaskStatus(outcome["status"]),
                                   fields=_fields(outcome), error=(outcome["error"] or "")[:4096] or None)])


def _fields(outcome: dict[str, Any]) -> dict[str, Any]:
    if isinstance(outcome.get("result"), dict):
        return dict(outcome["result"])
    text = str(outcome.get("stdout") or "").strip()
    fields: dict[str, Any] = {}
    if text:
        try:
            value = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
        except ValueError:
            value = None
        if isinstance(value, dict):
            fields = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            fields = {"value": value}
        else:
            fields = {"stdout": text[:MAX_TEXT]}
    try:
        check_result("a sample", fields)
    except PluginError:
        fields = {"stdout": text[:MAX_TEXT]}  # e.g. a number beyond 64 bits: keep it as text
    if outcome.get("exit_code") not in (None, 0):
        fields["exit_code"] = outcome["exit_code"]
    return fields


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is too large for a float")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN or Infinity would not survive the trip
