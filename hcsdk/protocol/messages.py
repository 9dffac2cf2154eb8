"""Every message the channel carries, as one frozen keyword-only dataclass per type: its fields,
its validation (:func:`parse`), its encoding (:meth:`to_wire`, :meth:`encode`) and its MAC
(:meth:`signed`, :meth:`verify`). No I/O: bytes in, messages out (:class:`MessageDecoder`);
messages in, bytes out (:func:`encode_messages`).

The wire is today's envelope, unchanged (old agents talk to new masters): ``t`` (type), ``uuid``,
``cmd``, ``taskid``, ``seq``, ``p`` (payload, absent on hb/bye/cancel) and ``m`` (the MAC).

A parsed message keeps the envelope it came from and :meth:`to_wire` returns that very dict, so
keys this build does not know (a newer peer's) survive a relay or the store, the MAC verifies
over exactly what was signed, and parse-then-forward copies nothing. Do not mutate what
:meth:`to_wire` returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, Self, TypeAlias, TypeVar

from . import wire
from .e2e import sign, verify
from .errors import MessageError
from .tasks import FINAL, TaskStatus

__all__ = ["DOWN", "UP", "Ack", "Bye", "Cancel", "Direction", "Done", "Heartbeat", "Message", "MessageDecoder",
           "Out", "Sample", "Start", "Stats", "Task", "encode_messages", "parse", "problem"]

MAX_SEQ = 2**31 - 1
_MAX_INT = 2**63 - 1
_STATUS = {s.value: s for s in FINAL}
_STREAMS = ("stdout", "stderr")


class Direction(StrEnum):
    UP = "up"  # agent (or proxy) -> master
    DOWN = "down"  # master -> agent


UP, DOWN = Direction.UP, Direction.DOWN


@dataclass(frozen=True, kw_only=True, slots=True)
class _Envelope:
    """The fields every envelope has. ``T`` is the wire's ``t``; ``P`` whether it has a payload."""

    T: ClassVar[str] = ""
    P: ClassVar[bool] = True
    uuid: str
    cmd: str = ""
    taskid: str = ""
    seq: int = 0
    mac: str | None = None
    # the envelope this message was parsed from (or last encoded to): see the module docstring
    _wire: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def payload(self) -> dict[str, Any]:
        return {}

    def wire_payload(self) -> dict[str, Any]:
        """The payload as it came, a newer peer's keys kept (what the master stores as a result's
        data), or as built from the fields for a message made here; {} when it has none."""
        p = self.to_wire().get("p")
        return p if isinstance(p, dict) else {}

    def to_wire(self) -> dict[str, Any]:
        """The envelope as a dict (shared: do not mutate it)."""
        if self._wire is not None:
            return self._wire
        env = self._envelope()
        object.__setattr__(self, "_wire", env)
        return env

    def _envelope(self) -> dict[str, Any]:
        """A new envelope built from the fields."""
        env: dict[str, Any] = {"t": self.T, "uuid": self.uuid, "cmd": self.cmd, "taskid": self.taskid,
                               "seq": self.seq}
        if self.P:
            env["p"] = self.payload()
        if self.mac is not None:
            env["m"] = self.mac
        return env

    def encode(self, max_frame: int = wire.DEFAULT_MAX_FRAME) -> bytes:
        """One frame (raises FrameError when the message exceeds ``max_frame``)."""
        return wire.encode_frame(self.to_wire(), max_frame)

    def signed(self, key: bytes) -> Self:
        """A copy carrying the end-to-end MAC under ``key`` (the agent's shared key). Its envelope
        is built once, signed by e2e and kept as the copy's wire dict: a copy of the envelope this
        message was parsed from (a newer peer's keys kept) or one built from the fields. (Costs
        what signing a dict literal does: dataclasses.replace ran __init__ and the envelope was
        built twice.)"""
        env = sign(key, dict(self._wire) if self._wire is not None else self._envelope())
        return _copier(type(self))(self, env["m"], env)

    def signed_wire(self, key: bytes) -> dict[str, Any]:
        """``signed(key).to_wire()`` without the copy: the signed envelope, for a sender that
        keeps only the wire (the master's tasks and acks, the agent's results)."""
        return sign(key, dict(self._wire) if self._wire is not None else self._envelope())

    def verify(self, key: bytes) -> bool:
        """Whether the MAC is right: the envelope is what the holder of ``key`` sent. False, never
        an exception, for an envelope without a canonical form."""
        return self.mac is not None and verify(key, self.to_wire())


# -- master -> agent ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class Task(_Envelope):
    """Run ``cmd`` with ``args`` within ``timeout`` seconds. ``exp`` (a wall-clock deadline) and
    ``aud`` (the agent's uuid) make a captured command useless later or for another agent.
    ``run`` is the id of the run the task belongs to (the agent tells the command); left off the
    wire when None, as an older master sends it (older agents ignore it: they read p's keys by name)."""

    T: ClassVar[str] = "task"
    args: dict[str, Any]
    timeout: float
    exp: float | None = None
    aud: str | None = None
    run: str | None = None

    def payload(self) -> dict[str, Any]:
        p = {"args": self.args, "timeout": self.timeout, "exp": self.exp, "aud": self.aud}
        if self.run is not None:
            p["run"] = self.run
        return p

    def refusal(self, agent_uuid: str, now: float) -> str | None:
        """Why agent ``agent_uuid`` must refuse this task at ``now`` (whether it knows the cmd is
        the agent's to add), or None."""
        if self.aud != agent_uuid or self.uuid != agent_uuid:
            return "task is addressed to another agent"
        if self.exp is None or self.exp < now:
            return "task has expired"
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Cancel(_Envelope):
    T: ClassVar[str] = "cancel"
    P: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack(_Envelope):
    """The master stored these results: ``ids`` lists ``[taskid, seq]`` pairs the agent may forget."""

    T: ClassVar[str] = "ack"
    ids: list[list[Any]]

    def payload(self) -> dict[str, Any]:
        return {"ids": self.ids}


@dataclass(frozen=True, kw_only=True, slots=True)
class Heartbeat(_Envelope):
    """Both ways: the channel is alive (never signed, never stored)."""

    T: ClassVar[str] = "hb"
    P: ClassVar[bool] = False


# -- agent -> master ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class Start(_Envelope):
    T: ClassVar[str] = "start"
    started_at: float | None

    def payload(self) -> dict[str, Any]:
        return {"started_at": self.started_at}


@dataclass(frozen=True, kw_only=True, slots=True)
class Out(_Envelope):
    T: ClassVar[str] = "out"
    stream: str  # stdout | stderr
    data: str

    def payload(self) -> dict[str, Any]:
        return {"stream": self.stream, "data": self.data}


@dataclass(frozen=True, kw_only=True, slots=True)
class Done(_Envelope):
    """A task's final status. ``error`` and ``result`` are left off the wire when empty.

    ``out`` folds in the output that came just before it: ``[stream, data]`` pieces that would
    have been ``out`` messages numbered ``seq - len(out)`` to ``seq - 1``. A short task is one
    message (and one MAC, one stored row, one acknowledgement) instead of start, out and done;
    left off the wire when empty, as an older agent sends it."""

    T: ClassVar[str] = "done"
    status: TaskStatus
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    truncated: dict[str, bool] = field(default_factory=dict)
    error: str | None = None
    result: Any = None
    out: list[list[str]] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        p: dict[str, Any] = {"status": self.status, "exit_code": self.exit_code, "started_at": self.started_at,
                             "finished_at": self.finished_at, "truncated": self.truncated}
        if self.error:
            p["error"] = self.error
        if self.result is not None:
            p["result"] = self.result
        if self.out:
            p["out"] = self.out
        return p


@dataclass(frozen=True, kw_only=True, slots=True)
class Sample(_Envelope):
    """One point of a scheduled collection's ``series`` at ``time`` (the schedule's tick)."""

    T: ClassVar[str] = "sample"
    series: str
    time: float
    status: TaskStatus
    fields: dict[str, Any]
    taken_at: float | None = None
    error: str | None = None

    def payload(self) -> dict[str, Any]:
        p: dict[str, Any] = {"series": self.series, "time": self.time}
        if self.taken_at is not None:
            p["taken_at"] = self.taken_at
        p["status"] = self.status
        p["fields"] = self.fields
        if self.error:
            p["error"] = self.error
        return p


@dataclass(frozen=True, kw_only=True, slots=True)
class Bye(_Envelope):
    """From a proxy: the client ``uuid`` behind it went away."""

    T: ClassVar[str] = "bye"
    P: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Stats(_Envelope):
    """From a proxy: its chunk cache's counters (kept in the master's memory only)."""

    T: ClassVar[str] = "stats"
    cache: dict[str, float]

    def payload(self) -> dict[str, Any]:
        return {"cache": self.cache}


Message: TypeAlias = Task | Cancel | Ack | Heartbeat | Start | Out | Done | Sample | Bye | Stats


_M = TypeVar("_M", bound=_Envelope)


def _maker(cls: type[_M]) -> Callable[..., _M]:
    """A constructor for :func:`parse` that fills the slots directly, every field by keyword: a
    frozen dataclass's ``__init__`` goes through ``object.__setattr__`` per field, which made it
    most of the cost of ingesting a result. (Generated because it is per class, like dataclasses'.)"""
    names = [f.name for f in fields(cls)]
    ns: dict[str, Any] = {"new": object.__new__, "cls": cls, **{f"s_{n}": getattr(cls, n).__set__ for n in names}}
    body = "".join(f"    s_{n}(o, {n})\n" for n in names)
    exec(f"def make(*, {', '.join(names)}):\n    o = new(cls)\n{body}    return o\n", ns)
    make: Callable[..., _M] = ns["make"]
    return make


_COPIERS: dict[type[Any], Callable[..., Any]] = {}


def _copier(cls: type[_M]) -> Callable[[_M, str, dict[str, Any]], _M]:
    """A function copying a ``cls`` with another ``mac`` and ``_wire``, slot by slot (what
    :meth:`signed` needs; generated once per class, like :func:`_maker`)."""
    copy = _COPIERS.get(cls)
    if copy is None:
        names = [f.name for f in fields(cls)]
        ns: dict[str, Any] = {"new": object.__new__, "cls": cls, **{f"s{n}": getattr(cls, n).__set__ for n in names}}
        value = {n: f"o.{n}" for n in names} | {"mac": "mac", "_wire": "wire"}
        body = "".join(f"    s{n}(c, {value[n]})\n" for n in names)
        exec(f"def copy(o, mac, wire):\n    c = new(cls)\n{body}    return c\n", ns)
        copy = _COPIERS[cls] = ns["copy"]
    return copy


def _fast_init(cls: type[_M]) -> None:
    """Give ``cls`` an ``__init__`` taking what the dataclass's takes (keyword-only, the same
    defaults) that fills the slots directly: the frozen dataclass's goes through
    ``object.__setattr__`` per field, twice the cost, and messages are built on every result."""
    ns: dict[str, Any] = {"new": object.__new__, "MISSING": MISSING}
    params, body = [], []
    for f in fields(cls):
        ns[f"s_{f.name}"] = getattr(cls, f.name).__set__
        if not f.init:
            ns[f"d_{f.name}"] = f.default
            body.append(f"    s_{f.name}(self, d_{f.name})\n")
            continue
        if f.default is not MISSING:
            ns[f"d_{f.name}"] = f.default
            params.append(f"{f.name}=d_{f.name}")
        elif f.default_factory is not MISSING:
            ns[f"f_{f.name}"] = f.default_factory
            params.append(f"{f.name}=MISSING")
            body.append(f"    if {f.name} is MISSING:\n        {f.name} = f_{f.name}()\n")
        else:
            params.append(f.name)
        body.append(f"    s_{f.name}(self, {f.name})\n")
    exec(f"def __init__(self, *, {', '.join(params)}):\n{''.join(body)}", ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]


for _cls in (Task, Cancel, Ack, Heartbeat, Start, Out, Done, Sample, Bye, Stats):
    _fast_init(_cls)

_new_task, _new_cancel, _new_ack, _new_heartbeat = _maker(Task), _maker(Cancel), _maker(Ack), _maker(Heartbeat)
_new_start, _new_out, _new_done, _new_sample = _maker(Start), _maker(Out), _maker(Done), _maker(Sample)
_new_bye, _new_stats = _maker(Bye), _maker(Stats)


# -- parsing: the checks the master (uplink) and the agent (downlink) made ---------------------------
def _num(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e13)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _mac_of(d: dict[str, Any]) -> str | None:
    m = d.get("m")
    return m if isinstance(m, str) else None


def _bare(make: Callable[..., Message], d: dict[str, Any]) -> Message:
    """A message without payload; fields nobody checks are read leniently (the envelope itself is
    kept as it came)."""
    return make(_wire=d, uuid=_str(d.get("uuid")), cmd=_str(d.get("cmd")), taskid=_str(d.get("taskid")),
               seq=_int(d.get("seq")), mac=_mac_of(d))


def _up_bare(make: Callable[..., Message]) -> Callable[[dict[str, Any]], Message]:
    def parse_bare(d: dict[str, Any]) -> Message:
        if not isinstance(d.get("uuid"), str):
            raise MessageError("uuid must be a string")
        return _bare(make, d)

    return parse_bare


def _task_part(d: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    taskid, seq, p = d.get("taskid"), d.get("seq"), d.get("p")
    if not isinstance(taskid, str) or not 0 < len(taskid) <= 128:
        raise MessageError("taskid must be a string of 1-128 characters")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise MessageError(f"seq must be an integer from 0 to {MAX_SEQ}")
    if not isinstance(p, dict):
        raise MessageError("payload must be an object")
    return taskid, seq, p


def _parse_start(d: dict[str, Any]) -> Message:
    taskid, seq, p = _task_part(d)
    started_at = p.get("started_at")
    if not _num(started_at):
        raise MessageError("start needs a numeric started_at")
    return _new_start(_wire=d, uuid=_str(d.get("uuid")), cmd=_str(d.get("cmd")), taskid=taskid, seq=seq, mac=_mac_of(d),
                      started_at=started_at)


def _parse_out(d: dict[str, Any]) -> Message:
    taskid, seq, p = _task_part(d)
    stream, data = p.get("stream"), p.get("data")
    if stream not in _STREAMS or not isinstance(data, str):
        raise MessageError("out needs stream stdout|stderr and string data")
    return _new_out(_wire=d, uuid=_str(d.get("uuid")), cmd=_str(d.get("cmd")), taskid=taskid, seq=seq, mac=_mac_of(d),
                    stream=stream, data=data)


def _final(value: Any, what: str) -> TaskStatus:
    status = _STATUS.get(value) if isinstance(value, str) else None
    if status is None:
        raise MessageError(f"{what} needs a status among {', '.join(FINAL)}")
    return status


def _error(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise MessageError("error must be a string or null")
    return value


def _parse_done(d: dict[str, Any]) -> Message:
    taskid, seq, p = _task_part(d)
    status = _final(p.get("status"), "done")
    code = p.get("exit_code")
    if code is not None and (not isinstance(code, int) or isinstance(code, bool) or abs(code) > _MAX_INT):
        raise MessageError("exit_code must be an integer or null")
    started_at, finished_at = p.get("started_at"), p.get("finished_at")
    if not (_num(started_at) and _num(finished_at)):
        raise MessageError("started_at and finished_at must be numbers or null")
    error = _error(p.get("error"))
    truncated = p.get("truncated", {})
    if not isinstance(truncated, dict) or not all(isinstance(v, bool) for v in truncated.values()):
        raise MessageError("truncated must map stream names to booleans")
    out = _folded(p.get("out"), seq)
    return _new_done(_wire=d, uuid=_str(d.get("uuid")), cmd=_str(d.get("cmd")), taskid=taskid, seq=seq, mac=_mac_of(d),
                     status=status, exit_code=code, started_at=started_at, finished_at=finished_at,
                     truncated=truncated, error=error, result=p.get("result"), out=out)


def _folded(out: Any, seq: int) -> list[list[str]]:
    """A done's folded output, checked as its ``out`` messages would be: pieces ``[stream, data]``,
    no more of them than the seqs before the done's."""
    if out is None:
        return []
    if not isinstance(out, list) or len(out) > seq:
        raise MessageError("done's out must be a list of [stream, data] pieces, at most seq of them")
    for piece in out:
        if (not isinstance(piece, list) or len(piece) != 2 or piece[0] not in _STREAMS
                or not isinstance(piece[1], str)):
            raise MessageError("done's out pieces must be [stdout|stderr, string data]")
    return out


def _parse_sample(d: dict[str, Any]) -> Message:
    taskid, seq, p = _task_part(d)
    series, when = p.get("series"), p.get("time")
    if not isinstance(series, str) or not 0 < len(series) <= 64:
        raise MessageError("sample needs a series name of 1-64 characters")
    if not (_num(when) and when is not None):
        raise MessageError("sample needs a numeric time")
    status = _final(p.get("status"), "sample")
    fields = p.get("fields")
    if not isinstance(fields, dict):
        raise MessageError("sample fields must be an object")
    error = _error(p.get("error"))
    taken_at = p.get("taken_at")
    return _new_sample(_wire=d, uuid=_str(d.get("uuid")), cmd=_str(d.get("cmd")), taskid=taskid, seq=seq,
                       mac=_mac_of(d), series=series, time=when, status=status, fields=fields, error=error,
                       taken_at=taken_at if _num(taken_at) else None)


def _parse_stats(d: dict[str, Any]) -> Message:
    """A proxy's counters: ``p.cache``, an object of at most 64 numbers under short names."""
    if not isinstance(d.get("uuid"), str):
        raise MessageError("uuid must be a string")
    p = d.get("p")
    cache = p.get("cache") if isinstance(p, dict) else None
    if not isinstance(cache, dict) or len(cache) > 64:
        raise MessageError("stats needs p.cache, an object of at most 64 counters")
    for key, value in cache.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise MessageError("stats counter names must be strings of 1-64 characters")
        # abs() before isfinite(): isfinite() of an integer beyond a float's range raises
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value) > _MAX_INT
                or not math.isfinite(value)):
            raise MessageError(f"stats counter {key!r} must be a finite number")
    return _new_stats(_wire=d, uuid=d["uuid"], cmd=_str(d.get("cmd")), taskid=_str(d.get("taskid")),
                      seq=_int(d.get("seq")), mac=_mac_of(d), cache=cache)


def _parse_task(d: dict[str, Any]) -> Message:
    taskid, cmd, p = d.get("taskid"), d.get("cmd"), d.get("p")
    if not isinstance(taskid, str) or not isinstance(cmd, str) or not taskid or not isinstance(p, dict):
        raise MessageError("malformed task message")
    args, timeout = p.get("args") or {}, p.get("timeout")
    if not isinstance(args, dict) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise MessageError("bad args or timeout")
    exp, aud, run = p.get("exp"), p.get("aud"), p.get("run")
    return _new_task(_wire=d, uuid=_str(d.get("uuid")), cmd=cmd, taskid=taskid, seq=_int(d.get("seq")), mac=_mac_of(d),
                     args=args, timeout=timeout, exp=exp if isinstance(exp, (int, float)) else None,
                     aud=aud if isinstance(aud, str) else None, run=run if isinstance(run, str) else None)


def _parse_cancel(d: dict[str, Any]) -> Message:
    # the agent looks the taskid up as a string, whatever came
    raw = d.get("taskid")
    return _new_cancel(_wire=d, uuid=_str(d.get("uuid")), cmd=_str(d.get("cmd")),
                       taskid=raw if isinstance(raw, str) else str(raw), seq=_int(d.get("seq")), mac=_mac_of(d))


def _parse_ack(d: dict[str, Any]) -> Message:
    p = d.get("p") or {}
    ids = (p.get("ids") or []) if isinstance(p, dict) else None
    if not isinstance(ids, list):
        raise MessageError("ack needs p.ids, a list of [taskid, seq] pairs")
    return _new_ack(_wire=d, uuid=_str(d.get("uuid")), cmd=_str(d.get("cmd")), taskid=_str(d.get("taskid")),
                    seq=_int(d.get("seq")), mac=_mac_of(d), ids=ids)


def _parse_down_hb(d: dict[str, Any]) -> Message:
    return _bare(_new_heartbeat, d)


_UP: dict[str, Callable[[dict[str, Any]], Message]] = {
    "start": _parse_start, "out": _parse_out, "done": _parse_done, "sample": _parse_sample,
    "hb": _up_bare(_new_heartbeat), "bye": _up_bare(_new_bye), "stats": _parse_stats,
}
_DOWN: dict[str, Callable[[dict[str, Any]], Message]] = {
    "task": _parse_task, "cancel": _parse_cancel, "ack": _parse_ack, "hb": _parse_down_hb,
}
assert set(_UP) == wire.UP_TYPES and set(_DOWN) == wire.DOWN_TYPES


def parse(d: dict[str, Any], direction: Direction | str) -> Message:
    """The message an envelope holds, checked as the receiving side (``UP``: the master, ``DOWN``:
    the agent) always checked it; raises MessageError with the reason. Whether the MAC is right
    is :meth:`verify`'s to say, with the key."""
    if not isinstance(d, dict):
        raise MessageError("envelope is not an object")
    kind = d.get("t")
    table = _UP if direction == UP else _DOWN
    parser = table.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise MessageError(f"unknown message type {kind!r}")
    return parser(d)


def problem(d: dict[str, Any]) -> str | None:
    """Why an uplink envelope is malformed, or None when it is fine."""
    try:
        parse(d, UP)
    except MessageError as exc:
        return exc.reason
    return None


class MessageDecoder:
    """Bytes in, messages out, for one direction of the channel: framing errors raise FrameError,
    malformed messages MessageError (both ProtocolError: drop the connection)."""

    def __init__(self, direction: Direction | str, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self._direction = Direction(direction)
        allowed = wire.UP_TYPES if self._direction == UP else wire.DOWN_TYPES
        self._frames = wire.FrameDecoder(max_frame, allowed=allowed)

    def feed(self, data: bytes) -> list[Message]:
        out = []
        for d in self._frames.feed(data):
            try:
                out.append(parse(d, self._direction))
            except MessageError as exc:
                raise MessageError(f"malformed {d['t']!r} message: {exc.reason}") from None
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return self._frames.pending


def encode_messages(msgs: Iterable[Message], max_frame: int = wire.DEFAULT_MAX_FRAME) -> bytes:
    """Several messages in one buffer, so a writer sends them in one DATA frame."""
    return b"".join(wire.encode_frame(m.to_wire(), max_frame) for m in msgs)

