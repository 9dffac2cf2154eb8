"""The protocol core without sockets: every message type round-trips and encodes to the bytes of
today's envelope dicts; parsing keeps the master's and the agent's checks (an oracle copy of the
master's checks as they were before issue 14 agrees with it on random input); random bytes and
random dicts raise nothing but the protocol's own errors; the task lifecycle is a table that a
state machine walks; and a MAC breaks when any field is altered."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import time
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hcsdk.protocol import (
    BUILTIN_CMDS,
    DOWN,
    FINAL,
    OPEN,
    SYSTEM_CMDS,
    TRANSITIONS,
    UP,
    Ack,
    Bye,
    Cancel,
    Done,
    FrameError,
    Heartbeat,
    Message,
    MessageDecoder,
    MessageError,
    Out,
    ProtocolError,
    Sample,
    Start,
    Stats,
    Task,
    TaskStatus,
    Verdict,
    can_move,
    check_cmd,
    check_request_args,
    e2e,
    encode_messages,
    parse,
    problem,
    validate_args,
    wire,
)
from hcsdk.protocol.args import ArgError
from hcsdk.protocol.tasks import SESSION_TRANSITIONS, SessionState, is_final, may_settle

KEY = bytes(range(32))
U = "0f1e2d3c-aaaa-bbbb-cccc-000000000001"


def _sign(d: dict[str, Any]) -> dict[str, Any]:
    return e2e.sign(KEY, d)


# -- one sample of each type, next to the dict today's code builds for it -------------------------
# (message, direction, the envelope as built at the site named, before the core)
SAMPLES: list[tuple[Message, str, dict[str, Any]]] = [
    # master/hub.py _task_msg
    (Task(uuid=U, cmd="shell", taskid="r1a2b3c.0", args={"script": "echo hi"}, timeout=30.0, exp=1.7e9,
          aud=U).signed(KEY), DOWN,
     _sign({"t": "task", "uuid": U, "cmd": "shell", "taskid": "r1a2b3c.0", "seq": 0,
            "p": {"args": {"script": "echo hi"}, "timeout": 30.0, "exp": 1.7e9, "aud": U}})),
    # master/hub.py _redeliver (cancel with the cmd) and cancel_run (without)
    (Cancel(uuid=U, cmd="shell", taskid="r1a2b3c.0").signed(KEY), DOWN,
     _sign({"t": "cancel", "uuid": U, "cmd": "shell", "taskid": "r1a2b3c.0", "seq": 0})),
    (Cancel(uuid=U, taskid="r1a2b3c.1").signed(KEY), DOWN,
     _sign({"t": "cancel", "uuid": U, "cmd": "", "taskid": "r1a2b3c.1", "seq": 0})),
    # master/hub.py ingest loop and refuse_sample
    (Ack(uuid=U, ids=[["r1a2b3c.0", 0], ["r1a2b3c.0", 1]]).signed(KEY), DOWN,
     _sign({"t": "ack", "uuid": U, "cmd": "", "taskid": "", "seq": 0,
            "p": {"ids": [["r1a2b3c.0", 0], ["r1a2b3c.0", 1]]}})),
    # hcsdk/net/mailbox.py (down) and hcsdk/net/channel.py (up)
    (Heartbeat(uuid=U), DOWN, {"t": "hb", "uuid": U, "cmd": "", "taskid": "", "seq": 0}),
    (Heartbeat(uuid=U), UP, {"t": "hb", "uuid": U, "cmd": "", "taskid": "", "seq": 0}),
    # agent/executor.py _emit
    (Start(uuid=U, cmd="shell", taskid="r1a2b3c.0", seq=0, started_at=1.7e9 + 0.25).signed(KEY), UP,
     _sign({"t": "start", "uuid": U, "cmd": "shell", "taskid": "r1a2b3c.0", "seq": 0,
            "p": {"started_at": 1.7e9 + 0.25}})),
    (Out(uuid=U, cmd="shell", taskid="r1a2b3c.0", seq=1, stream="stdout", data="hi \u00e9\u0000\n").signed(KEY), UP,
     _sign({"t": "out", "uuid": U, "cmd": "shell", "taskid": "r1a2b3c.0", "seq": 1,
            "p": {"stream": "stdout", "data": "hi \u00e9\u0000\n"}})),
    # agent/executor.py _done: no error, no result
    (Done(uuid=U, cmd="shell", taskid="r1a2b3c.0", seq=2, status=TaskStatus.OK, exit_code=0, started_at=1.5,
          finished_at=2.5).signed(KEY), UP,
     _sign({"t": "done", "uuid": U, "cmd": "shell", "taskid": "r1a2b3c.0", "seq": 2,
            "p": {"status": "ok", "exit_code": 0, "started_at": 1.5, "finished_at": 2.5, "truncated": {}}})),
    # agent/executor.py _done: an error, a result, a truncated stream
    (Done(uuid=U, cmd="hello.greet", taskid="r9.3", seq=5, status=TaskStatus.ERROR, started_at=1.5, finished_at=2.5,
          truncated={"stdout": True}, error="boom", result={"greeted": "x"}).signed(KEY), UP,
     _sign({"t": "done", "uuid": U, "cmd": "hello.greet", "taskid": "r9.3", "seq": 5,
            "p": {"status": "error", "exit_code": None, "started_at": 1.5, "finished_at": 2.5,
                  "truncated": {"stdout": True}, "error": "boom", "result": {"greeted": "x"}}})),
    # agent/executor.py _done: a short task's output folded in (its start dropped)
    (Done(uuid=U, cmd="shell", taskid="r9.5", seq=3, status=TaskStatus.OK, exit_code=0, started_at=1.5, finished_at=2.5,
          out=[["stdout", "hi\n"], ["stderr", "oops\n"]]).signed(KEY), UP,
     _sign({"t": "done", "uuid": U, "cmd": "shell", "taskid": "r9.5", "seq": 3,
            "p": {"status": "ok", "exit_code": 0, "started_at": 1.5, "finished_at": 2.5, "truncated": {},
                  "out": [["stdout", "hi\n"], ["stderr", "oops\n"]]}})),
    # agent/executor.py refuse
    (Done(uuid=U, cmd="shell", taskid="r9.4", seq=2**31 - 2, status=TaskStatus.ERROR, finished_at=3.0,
          error="refused: the command's MAC does not verify").signed(KEY), UP,
     _sign({"t": "done", "uuid": U, "cmd": "shell", "taskid": "r9.4", "seq": 2**31 - 2,
            "p": {"status": "error", "exit_code": None, "started_at": None, "finished_at": 3.0, "truncated": {},
                  "error": "refused: the command's MAC does not verify"}})),
    # agent/scheduler.py _collect
    (Sample(uuid=U, cmd="facts", taskid="sample:load:20000", seq=61_000, series="load", time=1.7e9, taken_at=1.7e9 + 1,
            status=TaskStatus.FAILED, fields={"value": 3, "exit_code": 1}, error="no").signed(KEY), UP,
     _sign({"t": "sample", "uuid": U, "cmd": "facts", "taskid": "sample:load:20000", "seq": 61_000,
            "p": {"series": "load", "time": 1.7e9, "taken_at": 1.7e9 + 1, "status": "failed",
                  "fields": {"value": 3, "exit_code": 1}, "error": "no"}})),
    # proxy/relay.py end
    (Bye(uuid=U), UP, {"t": "bye", "uuid": U, "cmd": "", "taskid": "", "seq": 0}),
    # proxy/app.py report_stats
    (Stats(uuid=U, cache={"hits": 3, "bytes": 1.5}).signed(KEY), UP,
     _sign({"t": "stats", "uuid": U, "cmd": "", "taskid": "", "seq": 0, "p": {"cache": {"hits": 3, "bytes": 1.5}}})),
]
IDS = [f"{m.T}-{i}" for i, (m, _, _) in enumerate(SAMPLES)]


def _json_dumps(obj: Any) -> bytes:
    # wire's fallback when orjson is missing (the zipapp agent on a bare Python)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize(("msg", "direction", "today"), SAMPLES, ids=IDS)
def test_bytes_equal_todays_envelope(msg: Message, direction: str, today: dict[str, Any]) -> None:
    assert wire.dumps(msg.to_wire()) == wire.dumps(today)
    assert _json_dumps(msg.to_wire()) == _json_dumps(today)
    assert msg.encode() == wire.encode_frame(today)


@pytest.mark.parametrize(("msg", "direction", "today"), SAMPLES, ids=IDS)
def test_round_trip(msg: Message, direction: str, today: dict[str, Any]) -> None:
    assert parse(msg.to_wire(), direction) == msg
    back = parse(wire.loads(msg.encode()[4:]), direction)  # through bytes, as a peer gets it
    assert back == msg and type(back) is type(msg)
    assert wire.dumps(back.to_wire()) == wire.dumps(today)
    assert problem(today) is None if direction == UP else True


def test_every_type_has_a_sample() -> None:
    assert {m.T for m, d, _ in SAMPLES if d == UP} == wire.UP_TYPES
    assert {m.T for m, d, _ in SAMPLES if d == DOWN} == wire.DOWN_TYPES


def test_decoder_and_batch() -> None:
    up = [m for m, d, _ in SAMPLES if d == UP]
    data = encode_messages(up)
    assert data == wire.encode_batch(m.to_wire() for m in up)
    decoder = MessageDecoder(UP)
    got = [msg for i in range(0, len(data), 7) for msg in decoder.feed(data[i : i + 7])]
    assert got == up and decoder.pending == 0
    with pytest.raises(FrameError):  # a downlink type on the uplink: a framing error, as before
        MessageDecoder(UP).feed(Cancel(uuid=U, taskid="x").encode())
    with pytest.raises(MessageError, match="malformed 'done' message: taskid must be"):
        MessageDecoder(UP).feed(wire.encode_frame({"t": "done", "uuid": U, "p": {}}))


@pytest.mark.parametrize(("out", "seq", "why"), [
    ("hi", 3, "a list of"),  # not a list
    ([["stdout", "a"], ["stdout", "b"]], 1, "at most seq"),  # more pieces than seqs before the done
    ([["stdin", "a"]], 3, "pieces must be"),  # no such stream
    ([["stdout", 7]], 3, "pieces must be"),  # data not text
    ([["stdout", "a", "extra"]], 3, "pieces must be"),
    ([{"stream": "stdout", "data": "a"}], 3, "pieces must be"),
])
def test_a_done_with_malformed_folded_output_is_refused(out: Any, seq: int, why: str) -> None:
    env = {"t": "done", "uuid": U, "cmd": "shell", "taskid": "r1.0", "seq": seq,
           "p": {"status": "ok", "exit_code": 0, "started_at": 1.0, "finished_at": 2.0, "truncated": {}, "out": out}}
    with pytest.raises(MessageError, match=why):
        parse(env, UP)


def test_unknown_keys_survive_a_parse() -> None:
    """A newer peer's extra keys: kept on the wire (the MAC still verifies, the store keeps them)."""
    d = _sign({"t": "done", "uuid": U, "cmd": "x", "taskid": "t.0", "seq": 1, "x-new": 1,
               "p": {"status": "ok", "exit_code": 0, "started_at": 1.0, "finished_at": 2.0, "truncated": {},
                     "new_field": [1, 2]}})
    msg = parse(d, UP)
    assert msg.to_wire() is d and msg.verify(KEY)


# -- the master's uplink checks, unchanged --------------------------------------------------------
_MAX_SEQ = 2**31 - 1


# a copy of master/messages.py as it was before issue 14 (commit 84b7db1), the oracle
_MAX_INT = 2**63 - 1


def _num(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e13)


def old_problem(msg: dict[str, Any]) -> str | None:
    """Why an uplink message is malformed, or None when it is fine."""
    kind = msg["t"]
    if kind in ("hb", "bye"):
        return None if isinstance(msg.get("uuid"), str) else "uuid must be a string"
    if kind == "stats":
        return _stats_problem(msg)
    taskid, seq, p = msg.get("taskid"), msg.get("seq"), msg.get("p")
    if not isinstance(taskid, str) or not 0 < len(taskid) <= 128:
        return "taskid must be a string of 1-128 characters"
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= _MAX_SEQ:
        return f"seq must be an integer from 0 to {_MAX_SEQ}"
    if not isinstance(p, dict):
        return "payload must be an object"
    if kind == "start":
        return None if _num(p.get("started_at")) else "start needs a numeric started_at"
    if kind == "sample":
        return _sample_problem(p)
    if kind == "out":
        if p.get("stream") not in ("stdout", "stderr") or not isinstance(p.get("data"), str):
            return "out needs stream stdout|stderr and string data"
        return None
    return _done_problem(p, seq)


def _done_problem(p: dict[str, Any], seq: int) -> str | None:
    if p.get("status") not in FINAL:
        return f"done needs a status among {', '.join(FINAL)}"
    code = p.get("exit_code")
    if code is not None and (not isinstance(code, int) or isinstance(code, bool) or abs(code) > _MAX_INT):
        return "exit_code must be an integer or null"
    if not (_num(p.get("started_at")) and _num(p.get("finished_at"))):
        return "started_at and finished_at must be numbers or null"
    if p.get("error") is not None and not isinstance(p.get("error"), str):
        return "error must be a string or null"
    truncated = p.get("truncated", {})
    if not isinstance(truncated, dict) or not all(isinstance(v, bool) for v in truncated.values()):
        return "truncated must map stream names to booleans"
    return _folded_problem(p.get("out"), seq)


def _folded_problem(out: Any, seq: int) -> str | None:
    """New in issue 16: output folded into a done, checked as its out messages would be."""
    if out is None:
        return None
    if not isinstance(out, list) or len(out) > seq:
        return "done's out must be a list of [stream, data] pieces, at most seq of them"
    for piece in out:
        if not (isinstance(piece, list) and len(piece) == 2 and piece[0] in ("stdout", "stderr")
                and isinstance(piece[1], str)):
            return "done's out pieces must be [stdout|stderr, string data]"
    return None


def _sample_problem(p: dict[str, Any]) -> str | None:
    if not isinstance(p.get("series"), str) or not 0 < len(p["series"]) <= 64:
        return "sample needs a series name of 1-64 characters"
    if not (_num(p.get("time")) and p.get("time") is not None):
        return "sample needs a numeric time"
    if p.get("status") not in FINAL:
        return f"sample needs a status among {', '.join(FINAL)}"
    if not isinstance(p.get("fields"), dict):
        return "sample fields must be an object"
    if p.get("error") is not None and not isinstance(p.get("error"), str):
        return "error must be a string or null"
    return None


def _stats_problem(msg: dict[str, Any]) -> str | None:
    """A proxy's counters: ``p.cache``, an object of at most 64 numbers under short names."""
    if not isinstance(msg.get("uuid"), str):
        return "uuid must be a string"
    p = msg.get("p")
    cache = p.get("cache") if isinstance(p, dict) else None
    if not isinstance(cache, dict) or len(cache) > 64:
        return "stats needs p.cache, an object of at most 64 counters"
    for key, value in cache.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            return "stats counter names must be strings of 1-64 characters"
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or abs(value) > _MAX_INT):
            return f"stats counter {key!r} must be a finite number"
    return None


json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
             | st.text(max_size=10) | st.sampled_from([*FINAL, "stdout", "stderr", "running", U]))
json_values = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=10,
)
PAYLOAD_KEYS = ["status", "exit_code", "started_at", "finished_at", "truncated", "error", "result", "stream",
                "data", "series", "time", "taken_at", "fields", "cache", "args", "timeout", "exp", "aud", "ids", "out"]
payloads = st.one_of(json_values, st.dictionaries(st.sampled_from(PAYLOAD_KEYS), json_values, max_size=8))
envelopes = st.fixed_dictionaries(
    {"t": st.sampled_from(sorted(wire.UP_TYPES | wire.DOWN_TYPES))},
    optional={"uuid": st.one_of(st.just(U), json_values), "cmd": json_values,
              "taskid": st.one_of(st.text(min_size=1, max_size=130), json_values),
              "seq": st.one_of(st.integers(-2, 2**31 + 1), json_values), "p": payloads, "m": json_values},
)


def _oracle(d: dict[str, Any]) -> str | None:
    try:
        return old_problem(d)
    except OverflowError:  # the old stats check crashed on an integer beyond a float's range
        assume(False)
        raise


@settings(max_examples=600, deadline=None)
@given(envelopes)
def test_uplink_checks_agree_with_the_old_master(d: dict[str, Any]) -> None:
    assume(d["t"] in wire.UP_TYPES)
    assert problem(d) == _oracle(d)


@settings(max_examples=400, deadline=None)
@given(st.one_of(envelopes, json_values), st.sampled_from([UP, DOWN]))
def test_parse_raises_only_message_error(d: Any, direction: str) -> None:
    try:
        msg = parse(d, direction)
    except MessageError:
        return
    assert msg.to_wire() is d
    assert msg.verify(KEY) in (True, False)
    assert isinstance(msg.uuid, str) and isinstance(msg.taskid, str) and isinstance(msg.seq, int)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.sampled_from([UP, DOWN]))
def test_random_bytes_raise_only_protocol_errors(data: bytes, direction: str) -> None:
    try:
        MessageDecoder(direction, max_frame=1024).feed(data)
    except ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(envelopes, json_values), max_size=4), st.sampled_from([UP, DOWN]),
       st.integers(0, 8))
def test_framed_random_json_raises_only_protocol_errors(items: list[Any], direction: str, cut: int) -> None:
    """Well-framed garbage gets past the framing into the message checks."""
    bodies = [json.dumps(item).encode() for item in items]  # json: any peer may send integers beyond 64 bits
    data = b"".join(struct.pack(">I", len(body)) + body for body in bodies)
    try:
        MessageDecoder(direction).feed(data[: len(data) - cut])
    except ProtocolError:
        pass


# -- the agent's downlink checks, unchanged ---------------------------------------------------------
def _old_submit_check(msg: dict[str, Any]) -> str | None:
    """agent/executor.py Executor.submit before issue 14: what made it ignore a task message."""
    taskid, cmd, p = msg.get("taskid"), msg.get("cmd"), msg.get("p")
    if not isinstance(taskid, str) or not isinstance(cmd, str) or not taskid or not isinstance(p, dict):
        return "malformed task message"
    args, timeout = p.get("args") or {}, p.get("timeout")
    if not isinstance(args, dict) or not isinstance(timeout, (int, float)) or timeout <= 0:
        return "bad args or timeout"
    return None


def _old_refuse(agent: str, msg: dict[str, Any], p: dict[str, Any], now: float) -> str | None:
    """agent/executor.py Executor._refuse before issue 14 (without the agent's own cmd check)."""
    if p.get("aud") != agent or msg.get("uuid") != agent:
        return "task is addressed to another agent"
    exp = p.get("exp")
    if not isinstance(exp, (int, float)) or exp < now:
        return "task has expired"
    return None


@settings(max_examples=400, deadline=None)
@given(envelopes)
def test_downlink_task_checks_agree_with_the_old_agent(d: dict[str, Any]) -> None:
    d["t"] = "task"
    expected = _old_submit_check(d)
    try:
        msg = parse(d, DOWN)
    except MessageError as exc:
        assert exc.reason == expected
        return
    assert expected is None and isinstance(msg, Task)
    now = time.time()
    assert msg.refusal(U, now) == _old_refuse(U, d, d["p"], now)
    assert msg.args == (d["p"].get("args") or {})


def test_downlink_examples() -> None:
    assert isinstance(parse({"t": "hb"}, DOWN), Heartbeat)  # the agent never looked inside a heartbeat
    assert parse({"t": "cancel", "uuid": U, "taskid": None}, DOWN).taskid == "None"  # str(), as the agent did
    assert parse({"t": "ack", "uuid": U}, DOWN) == Ack(uuid=U, ids=[])
    with pytest.raises(MessageError):
        parse({"t": "ack", "uuid": U, "p": [1]}, DOWN)  # crashed the agent's handler before
    with pytest.raises(MessageError, match="unknown message type 'done'"):
        parse({"t": "done"}, DOWN)
    expired = Task(uuid=U, cmd="shell", taskid="t", args={}, timeout=1.0, exp=1.0, aud=U)
    assert expired.refusal(U, time.time()) == "task has expired"
    assert expired.refusal("someone-else", time.time()) == "task is addressed to another agent"


def test_stats_with_a_huge_integer_is_malformed_not_a_crash() -> None:
    d = {"t": "stats", "uuid": U, "p": {"cache": {"x": 10**400}}}
    assert problem(d) == "stats counter 'x' must be a finite number"
    assert problem({**d, "p": {"cache": {"x": math.inf}}}) == "stats counter 'x' must be a finite number"


# -- MACs -----------------------------------------------------------------------------------------
def _tampered(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return "x" if value is None else not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, 0]
    return {**value, "x": 1}


def _paths(d: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [(k,) for k in d if k not in ("m", "p")]
    out += [("p", k) for k in d.get("p", {})]
    return out


SIGNED = [(m, d) for m, d, _ in SAMPLES if m.mac is not None]


@pytest.mark.parametrize(("msg", "direction"), SIGNED, ids=[m.T for m, _ in SIGNED])
def test_tampering_any_field_breaks_the_mac(msg: Message, direction: str) -> None:
    assert msg.verify(KEY) and e2e.verify(KEY, dict(msg.to_wire()))
    assert not msg.verify(bytes(32)) and not dataclasses.replace(msg, mac=None).verify(KEY)
    wire_dict = msg.to_wire()
    for path in _paths(wire_dict):
        altered = json.loads(json.dumps(wire_dict))
        node = altered
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _tampered(node[path[-1]])
        try:
            back = parse(altered, direction)
        except MessageError:
            continue  # refused before the MAC is even looked at
        assert not back.verify(KEY), path
    for field in dataclasses.fields(msg):
        if field.name in ("mac", "_wire"):
            continue
        changed = dataclasses.replace(msg, **{field.name: _tampered(getattr(msg, field.name))})
        assert not changed.verify(KEY), field.name
        assert changed.signed(KEY).verify(KEY)


def test_signed_is_todays_sign() -> None:
    msg = Heartbeat(uuid=U)
    assert msg.signed(KEY).mac == e2e.sign(KEY, dict(msg.to_wire()))["m"]


# -- vocabularies ---------------------------------------------------------------------------------
def test_statuses_and_cmd_words() -> None:
    assert FINAL == ("ok", "failed", "timeout", "offline", "cancelled", "error")
    assert OPEN == ("pending", "dispatched", "running")
    assert set(FINAL) | set(OPEN) == set(TaskStatus)
    assert BUILTIN_CMDS == ("shell", "exec", "ping", "facts", "echo")
    assert all(c.startswith("zy.") for c in SYSTEM_CMDS)
    for cmd in ("shell", "hello.greet", "a_1.b2", *SYSTEM_CMDS):
        check_cmd(cmd)
    with pytest.raises(MessageError, match=r"^unknown system cmd 'zy.nope' \(known: zy.plugin.install, "):
        check_cmd("zy.nope")
    for bad in ("Shell", "a..b", "1a", "a" * 65, "", "a-b"):
        with pytest.raises(MessageError, match=r"is not a cmd word: lowercase letters, digits and _ in "
                                               r"dot-separated parts \(built in: shell, exec, ping, facts, echo; "
                                               r"others name plugins\)$"):
            check_cmd(bad)


def test_request_args_and_builtin_schemas() -> None:
    with pytest.raises(MessageError, match=r"^cmd 'shell' needs args.script, a string$"):
        check_request_args("shell", {})
    for argv in (None, [], ["ls", 1], "ls"):
        with pytest.raises(MessageError, match=r"^cmd 'exec' needs args.argv, a non-empty list of strings$"):
            check_request_args("exec", {"argv": argv})
    check_request_args("shell", {"script": "true", "extra": 1})  # the agent refuses extras, later
    assert validate_args("shell", {"script": "true"}) == {"script": "true", "shell": "/bin/sh"}
    assert validate_args("echo", {}) == {"text": ""}
    assert validate_args("hello.greet", {"any": 1}) == {"any": 1}
    with pytest.raises(ArgError, match=r"^unknown argument extra \(takes: script, shell\)$"):
        validate_args("shell", {"script": "true", "extra": 1})
    with pytest.raises(ArgError, match=r"^the length of args.argv must be at least 1 \(got 0\)$"):
        validate_args("exec", {"argv": []})


# -- nesting: what the core accepts is bounded, and nothing deep escapes as another exception -------
def _depth(value: Any) -> int:
    """The reference: recursive, for the shallow values Hypothesis makes."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _nested(kinds: list[bool], leaf: str = "1") -> str:
    """JSON text of containers nested len(kinds) deep (True: a list, False: an object), built as
    text: json.dumps itself runs out of stack on what these tests send."""
    return "".join("[" if k else '{"k":' for k in kinds) + leaf + "".join("]" if k else "}" for k in reversed(kinds))


#: where a deep value goes in a frame, and the depth of the container holding it (the envelope 1)
DEEP_SPOTS = {
    "done.result": ('{"t":"done","uuid":"%s","taskid":"r1.0","seq":1,"m":"00","p":{"status":"ok","result":%%s}}', 2),
    "done.unknown": ('{"t":"done","uuid":"%s","taskid":"r1.0","seq":1,"m":"00","p":{"status":"ok","x":%%s}}', 2),
    "sample.fields": ('{"t":"sample","uuid":"%s","taskid":"s.1","seq":1,"m":"00","p":{"series":"s","time":1,'
                      '"status":"ok","fields":{"f":%%s}}}', 3),
    "task.args": ('{"t":"task","uuid":"%s","cmd":"x","taskid":"r1.0","seq":0,"m":"00",'
                  '"p":{"args":{"a":%%s},"timeout":5}}', 3),
    "envelope": ('{"t":"hb","uuid":"%s","x":%%s}', 1),
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(DEEP_SPOTS)), st.lists(st.booleans(), min_size=1, max_size=1100),
       st.sampled_from([UP, DOWN]))
def test_deep_payloads_raise_only_protocol_errors(spot: str, kinds: list[bool], direction: str) -> None:
    """orjson reads up to 1024 levels and the MAC's json.dumps runs out of stack near 1000: what
    the decoder passes is at most MAX_DEPTH deep, and parse and both verifies never raise."""
    template, holder = DEEP_SPOTS[spot]
    body = ((template % U) % _nested(kinds)).encode()
    frame = struct.pack(">I", len(body)) + body
    try:
        [d] = wire.FrameDecoder().feed(frame)
    except FrameError as exc:
        assert holder + len(kinds) > wire.MAX_DEPTH and "nests deeper than 64 levels" in str(exc) or "depth" in str(exc)
        with pytest.raises(ProtocolError):
            MessageDecoder(direction).feed(frame)
        return
    assert holder + len(kinds) <= wire.MAX_DEPTH
    assert e2e.verify(KEY, d) is False  # "00" is no MAC, but the canonical form exists
    try:
        msg = parse(d, direction)
    except MessageError:
        return
    assert msg.verify(KEY) is False
    assert e2e.verify(KEY, e2e.sign(KEY, dict(d))) is True  # what passed the decoder can be signed


def test_deep_values_built_in_memory_never_verify_and_cannot_be_signed() -> None:
    deep: list[Any] = []
    inner = deep
    for _ in range(5000):  # deeper than the interpreter's stack: json.dumps raises RecursionError
        inner.append([])
        inner = inner[0]
    for bad in ({"t": "done", "uuid": U, "m": "00", "p": {"status": "ok", "result": deep}},
                {"t": "done", "uuid": U, "m": "00", "p": {"status": "ok", "result": {1: 2, "a": 3}}},  # unsortable
                {"t": "done", "uuid": U, "m": "00", "p": {"status": "ok", "result": {1, 2}}}):  # not JSON
        assert e2e.verify(KEY, bad) is False
        with pytest.raises(MessageError):
            e2e.canonical(bad)
        msg = parse({**bad, "taskid": "r1.0", "seq": 1}, UP)
        assert msg.verify(KEY) is False
        with pytest.raises(ProtocolError):
            msg.signed(KEY)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.sampled_from(["result", "x"]))
def test_what_is_encoded_is_what_the_peer_decodes(depth: int, key: str) -> None:
    """No sender queues a frame its peer's decoder refuses (a refused frame costs the channel, and
    an agent would resend it after every reconnect): signing and encoding refuse exactly what the
    decoder would, and an agent's executor turns that ValueError into an error Done."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    msg = Done(uuid=U, taskid="r1.0", seq=1, status=TaskStatus.OK, result=value)
    fits = 2 + depth <= wire.MAX_DEPTH
    try:
        frame = msg.signed(KEY).encode()
    except ProtocolError as exc:
        assert not fits and "nests deeper than 64 levels" in str(exc)
        with pytest.raises(FrameError, match="nests deeper"):
            wire.encode_frame({"t": "done", "p": {key: value}})
        return
    assert fits
    [back] = MessageDecoder(UP).feed(frame)
    assert back.verify(KEY) and back == msg.signed(KEY)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(0, 6), st.integers(0, 3000))
def test_nests_deeper_is_the_depth(value: Any, limit: int, pad: int) -> None:
    """The cheap check agrees with a plain recursive depth, on small texts (counted), big ones
    (walked on a budget, then counted) and without a text (walked)."""
    from hcsdk.protocol.depth import nests_deeper

    want = _depth(value) > limit
    assert nests_deeper(value, limit) is want
    text = json.dumps(value)
    assert nests_deeper(value, limit, text) is want
    assert nests_deeper(value, limit, text.encode()) is want
    wide = [value] + [[0]] * pad  # big text, many values: past the walk's budget
    want = _depth(wide) > limit + 1
    assert nests_deeper(wide, limit + 1, json.dumps(wide)) is want
    assert nests_deeper(wide, limit + 1, "{" * 5000 + json.dumps(wide)) is want  # counted, then walked


# -- the master's request check and the agent's argument check: one definition ----------------------
def _old_check_request_args(cmd: str, args: dict[str, Any]) -> str | None:
    """hcsdk.protocol.vocab.check_request_args before it read BUILTIN_ARGS: its refusal, or None."""
    if cmd == "shell" and not isinstance(args.get("script"), str):
        return "cmd 'shell' needs args.script, a string"
    if cmd == "exec":
        argv = args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            return "cmd 'exec' needs args.argv, a non-empty list of strings"
    return None


_arg_values = st.one_of(json_leaf, st.lists(st.one_of(st.text(max_size=4), json_leaf), max_size=3), json_values)
request_args = st.dictionaries(st.sampled_from(["script", "shell", "argv", "text", "extra"]), _arg_values, max_size=4)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([*BUILTIN_CMDS, "hello.greet"]), request_args)
def test_the_masters_check_is_the_old_one_and_never_refuses_what_the_agent_runs(cmd: str, args: dict[str, Any]) -> None:
    """Invariants: the master's check (derived from BUILTIN_ARGS) accepts and refuses exactly what
    it did, with the same words; and whatever the agent's full check accepts, the master's does
    (the master may pass args the agent then refuses: unknown ones, a wrong-typed optional one)."""
    try:
        check_request_args(cmd, args)
        got = None
    except MessageError as exc:
        got = exc.reason
    assert got == _old_check_request_args(cmd, args)
    try:
        validate_args(cmd, args)
    except ArgError:
        return
    assert got is None


def test_request_args_too_deep_for_a_task_frame_are_refused() -> None:
    from hcsdk.protocol.vocab import MAX_ARGS_DEPTH

    fits: Any = {"a": 1}
    for _ in range(MAX_ARGS_DEPTH - 1):
        fits = {"a": fits}
    check_request_args("hello.greet", fits)  # MAX_ARGS_DEPTH levels: sent, signed, decoded
    task = Task(uuid=U, cmd="hello.greet", taskid="r1.0", args=fits, timeout=5, exp=1e10, aud=U).signed(KEY)
    [back] = MessageDecoder(DOWN).feed(task.encode())
    assert isinstance(back, Task) and back.verify(KEY) and back.args == fits
    with pytest.raises(MessageError, match=r"^args nest deeper than 62 levels of objects and lists \(a task's "):
        check_request_args("hello.greet", {"a": fits})


# -- the task lifecycle ---------------------------------------------------------------------------
def test_transition_table() -> None:
    assert set(TRANSITIONS) == set(TaskStatus)
    path = [TaskStatus.PENDING, TaskStatus.DISPATCHED, TaskStatus.RUNNING, TaskStatus.OK]
    assert all(can_move(a, b) for a, b in zip(path, path[1:], strict=False))
    assert not can_move("running", "dispatched") and not can_move("nonsense", "ok") and not can_move("ok", "x")
    assert all(not TRANSITIONS[s] for s in FINAL)
    assert may_settle("offline", Verdict.MASTER) and not may_settle("offline", Verdict.AGENT)
    assert may_settle("running", None)
    assert all(SessionState(s) for s in SESSION_TRANSITIONS)


STATUSES = st.sampled_from(list(TaskStatus))


class TaskLifecycle(RuleBasedStateMachine):
    """Tasks moved as the store moves them (created dispatched or offline; start; an agent's done;
    a master's verdict), plus arbitrary attempted moves that the table must refuse or allow."""

    @initialize()
    def setup(self) -> None:
        self.status: dict[int, TaskStatus] = {}
        self.decided_by: dict[int, str | None] = {}
        self.history: dict[int, list[TaskStatus]] = {}

    def _set(self, i: int, status: TaskStatus, by: str | None = None) -> None:
        self.status[i] = status
        self.decided_by[i] = by
        self.history[i].append(status)

    @rule(online=st.booleans())
    def create(self, online: bool) -> None:
        i = len(self.status)
        self.history[i] = []
        self._set(i, TaskStatus.DISPATCHED if online else TaskStatus.OFFLINE, None if online else Verdict.MASTER)

    @precondition(lambda self: bool(self.status))
    @rule(data=st.data(), to=STATUSES)
    def attempt(self, data: st.DataObject, to: TaskStatus) -> None:
        i = data.draw(st.sampled_from(sorted(self.status)))
        current = self.status[i]
        assert can_move(current, to) == (to in TRANSITIONS[current])
        if can_move(current, to):  # a final status decided by the master or by the agent
            self._set(i, to, data.draw(st.sampled_from(list(Verdict))) if is_final(to) else None)

    @precondition(lambda self: bool(self.status))
    @rule(data=st.data(), verdict=st.sampled_from(FINAL))
    def agent_done(self, data: st.DataObject, verdict: TaskStatus) -> None:
        """An agent's own verdict: settles an open task or corrects a master's presumption."""
        i = data.draw(st.sampled_from(sorted(self.status)))
        if may_settle(self.status[i], self.decided_by[i]):
            self._set(i, verdict, Verdict.AGENT)

    @invariant()
    def final_is_absorbing(self) -> None:
        for history in self.history.values():
            finals = [k for k, s in enumerate(history) if is_final(s)]
            if finals:  # nothing leaves the final states (a correction moves between two of them)
                assert all(is_final(s) for s in history[finals[0]:])
                # at most one correction: the master's presumption, replaced by the agent's verdict
                assert len(history) - finals[0] <= 2
            for a, b in zip(history, history[1:], strict=False):
                assert can_move(a, b) or (is_final(a) and is_final(b))

    @invariant()
    def agent_verdicts_are_final(self) -> None:
        for i, status in self.status.items():
            if self.decided_by[i] == Verdict.AGENT:
                assert not may_settle(status, Verdict.AGENT)
                assert not TRANSITIONS[status]


TestTaskLifecycle = TaskLifecycle.TestCase
TestTaskLifecycle.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


# -- review findings ------------------------------------------------------------------------------
def test_a_trailing_newline_is_not_a_digest_nor_a_cmd_word() -> None:
    """``^...$`` with .match() accepted "x\\n": remote text must match the whole pattern."""
    from hcsdk.protocol import names, vocab
    from hcsdk.protocol.manifest import Manifest, ManifestError

    sha = "a" * 64
    assert names.is_sha256(sha) and names.is_digest_dir(sha[:16]) and vocab.is_cmd_word("shell")
    for suffix in ("\n", "\r\n", " "):
        assert not names.is_sha256(sha + suffix)
        assert not names.is_digest_dir(sha[:16] + suffix)
        assert not vocab.is_cmd_word("shell" + suffix)
        # the compiled patterns are exported too (master.blobs.SHA_RE): safe with .match as well
        assert names.SHA256.match(sha + suffix) is None and names.DIGEST_DIR.match(sha[:16] + suffix) is None
        assert vocab.CMD_RE.match("shell" + suffix) is None
        with pytest.raises(names.UnsafeName):
            names.check_sha256(sha + suffix)
        with pytest.raises(MessageError, match="is not a cmd word"):
            check_cmd("hello.greet" + suffix)
        with pytest.raises(ManifestError, match="64 lowercase hex digits"):
            Manifest(name="a.bin", size=1, sha256=sha + suffix, chunk_size=1, chunks=(sha,))


def _python(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_importing_args_does_not_load_the_messages() -> None:
    """A plugin worker imports hcsdk.protocol.args at start: the package must not pull in the
    messages, the framing or orjson with it (a real interpreter, fresh sys.modules)."""
    loaded = _python("import sys, hcsdk.protocol.args; "
                     "print(*sorted(m for m in sys.modules if m.startswith('hcsdk.protocol') or m == 'orjson'))")
    assert loaded.split() == ["hcsdk.protocol", "hcsdk.protocol.args"]


def test_the_package_names_load_on_first_use() -> None:
    import hcsdk.protocol as protocol

    assert sorted(protocol.__all__) == sorted(protocol._WHERE) and set(protocol.__all__) <= set(dir(protocol))
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None, name
    assert protocol.Task is Task and protocol.parse is parse and protocol.FrameError is FrameError
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        protocol.Nope  # noqa: B018
    assert _python("from hcsdk.protocol import Task, parse, e2e, wire; print(Task.T, parse.__name__)") == "task parse\n"


def test_signed_keeps_a_parsed_envelope_and_builds_it_once() -> None:
    """Signing again keeps what the envelope carried (a newer peer's keys included), signs that
    very dict, and leaves the original alone."""
    other = bytes(32)
    d = _sign({"t": "task", "uuid": U, "cmd": "shell", "taskid": "r1.0", "seq": 0, "x-new": 1,
               "p": {"args": {"script": "true"}, "timeout": 5, "exp": 1.7e9, "aud": U, "new_field": [1]}})
    before = json.dumps(d, sort_keys=True)
    msg = parse(d, DOWN)
    again = msg.signed(other)
    env = again.to_wire()
    assert env is again.to_wire() and env is not d and json.dumps(d, sort_keys=True) == before
    assert env["x-new"] == 1 and env["p"]["new_field"] == [1] and env["m"] == again.mac
    assert again.verify(other) and e2e.verify(other, env) and not again.verify(KEY) and msg.verify(KEY)
    assert again == dataclasses.replace(msg, mac=env["m"])
    fresh = Task(uuid=U, cmd="shell", taskid="r1.0", args={"script": "true"}, timeout=5.0, exp=1.7e9, aud=U)
    signed = fresh.signed(KEY)
    assert signed.to_wire() == _sign(dict(fresh.to_wire())) and signed.encode() == wire.encode_frame(signed.to_wire())
    assert fresh.mac is None and "m" not in fresh.to_wire()


def test_a_task_carries_its_run_when_the_master_names_it() -> None:
    """``run`` (added in issue 14): on the wire only when set, so today's bytes are unchanged
    without it; parsed leniently, as ``aud`` is (an older agent ignores the key)."""
    plain = Task(uuid=U, cmd="shell", taskid="r1a2b3c.0", args={"script": "true"}, timeout=5.0, exp=1.7e9, aud=U)
    assert "run" not in plain.to_wire()["p"]
    msg = dataclasses.replace(plain, run="r1a2b3c").signed(KEY)
    assert msg.to_wire()["p"]["run"] == "r1a2b3c" and msg.verify(KEY)
    back = parse(wire.loads(msg.encode()[4:]), DOWN)
    assert back == msg and isinstance(back, Task) and back.run == "r1a2b3c"
    odd = _sign({**msg.to_wire(), "p": {**msg.to_wire()["p"], "run": 7}})
    assert isinstance(task := parse(odd, DOWN), Task) and task.run is None


# -- the canonical form is the stdlib's, byte for byte ------------------------------------------------
canonical_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=8), canonical_values, max_size=6))
def test_canonical_form_and_mac_are_the_stdlib_ones(d: dict[str, Any]) -> None:
    """Old agents and the zero-dependency build compute the MAC with json.dumps and hmac.new:
    the cached encoder and the one-shot HMAC must give the very same bytes for any message."""
    import hashlib
    import hmac

    body = {k: v for k, v in d.items() if k != "m"}
    expected = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert e2e.canonical(d) == expected
    signed = e2e.sign(KEY, dict(d))
    assert signed["m"] == hmac.new(KEY, expected, hashlib.sha256).hexdigest()
    assert e2e.verify(KEY, signed)


def test_a_cycle_has_no_canonical_form() -> None:
    cyclic: dict[str, Any] = {"t": "done"}
    cyclic["p"] = cyclic
    with pytest.raises(MessageError):
        e2e.canonical(cyclic)
    assert e2e.verify(KEY, {**cyclic, "m": "00"}) is False


def test_messages_built_by_keyword_match_the_dataclass_contract() -> None:
    """The generated __init__ (cheaper than the frozen dataclass's) keeps its contract: keyword
    only, the same defaults, a fresh default per instance, required fields required, frozen."""
    a = Done(uuid=U, status=TaskStatus.OK)
    b = Done(uuid=U, status=TaskStatus.OK)
    assert a == b and a.truncated == {} and a.truncated is not b.truncated
    assert (a.cmd, a.taskid, a.seq, a.mac, a.exit_code, a.error, a.result) == ("", "", 0, None, None, None, None)
    assert a.to_wire()["p"]["status"] == "ok"
    with pytest.raises(TypeError):
        Done(uuid=U)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Start(U, None)  # type: ignore[misc, call-arg, arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.seq = 2  # type: ignore[misc]
    assert dataclasses.replace(a, seq=4).seq == 4
    t = Task(uuid=U, cmd="echo", taskid="r1.0", args={"x": 1}, timeout=5)
    assert t.signed_wire(KEY) == t.signed(KEY).to_wire()
    assert parse(t.signed_wire(KEY), DOWN).verify(KEY)
