"""The pieces with no I/O: framing, backoff, join tokens, target resolution, the spool."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.spool import Spool
from hcsdk import JoinToken, JoinTokenError
from hcsdk._targets import target_spec
from hcsdk.common.backoff import Backoff
from hcsdk.common.duration import seconds
from hcsdk.protocol.messages import Sample
from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.wire import UP_TYPES, FrameDecoder, FrameError, encode_batch, encode_frame
from master.targets import TargetError, resolve

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {"t": st.sampled_from(sorted(UP_TYPES)), "uuid": st.text(max_size=40), "cmd": st.text(max_size=10),
     "taskid": st.text(max_size=20), "seq": st.integers(0, 2**31), "p": json_values}
)


@given(st.lists(messages, max_size=8), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_frames_survive_any_split_into_chunks(msgs: list[dict], cuts: list[int]) -> None:
    data = encode_batch(msgs)
    decoder = FrameDecoder(allowed=UP_TYPES)
    out, pos, i = [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out += decoder.feed(data[pos : pos + step])
        pos, i = pos + step, i + 1
    assert out == msgs
    assert decoder.pending == 0


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decoder_never_crashes_on_garbage(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=64, allowed=UP_TYPES)
    try:
        for msg in decoder.feed(data):
            assert msg["t"] in UP_TYPES
    except FrameError:
        pass


def test_oversized_frames_are_refused_before_buffering() -> None:
    with pytest.raises(FrameError, match="exceeds the limit"):
        FrameDecoder(max_frame=10).feed(struct.pack(">I", 11))
    with pytest.raises(FrameError, match="exceeds the frame limit"):
        encode_frame({"t": "out", "p": "x" * 100}, max_frame=50)


def test_backoff_has_full_jitter_within_a_growing_capped_window() -> None:
    b = Backoff(base=1, cap=8, rng=random.Random(1))
    windows = [1, 2, 4, 8, 8, 8]
    for window in windows:
        assert 0 <= b.next_delay() <= window
    b.reset()
    assert b.next_delay() <= 1
    delays = [Backoff(1, 8, random.Random(i)).next_delay() for i in range(200)]
    assert min(delays) < 0.1 and max(delays) > 0.9, "delays must spread over the whole window"


def test_join_token_round_trip_and_damage() -> None:
    token = JoinToken(urls=("https://m:8443",), ca_fingerprint="sha256:" + "ab" * 32, e2e_public="k",
                      token_id="id1", secret="s")
    assert JoinToken.decode(token.encode()) == token
    with pytest.raises(JoinTokenError, match="zyj1"):
        JoinToken.decode("abc")
    with pytest.raises(JoinTokenError, match="damaged"):
        JoinToken.decode(token.encode()[:-6])


AGENTS = [
    {"uuid": "u1", "hostname": "web-1", "labels": {"role": "web", "idc": "hk"}},
    {"uuid": "u2", "hostname": "web-2", "labels": {"role": "web", "idc": "sg"}},
    {"uuid": "u3", "hostname": "db-1", "labels": {"role": "db"}},
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"expr": "web-*"}, ["u1", "u2"]),
        ({"expr": "u?"}, ["u1", "u2", "u3"]),
        ({"expr": "label:role=web,idc=sg"}, ["u2"]),
        ({"expr": "label:idc"}, ["u1", "u2"]),
        ({"expr": "db-1"}, ["u3"]),
        ({"uuids": ["u3", "u1", "u3"]}, ["u3", "u1"]),
    ],
)
def test_resolve(spec: dict, expected: list[str]) -> None:
    assert [a["uuid"] for a in resolve(spec, AGENTS)] == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"expr": "web-9"}, "unknown target 'web-9'"),
        ({"expr": "label:role=cache"}, "matched no agent"),
        ({"expr": "label:=x"}, "empty key"),
        ({"uuids": []}, "empty"),
        ({"uuids": ["u1", "nope"]}, "unknown target 'nope'"),
        ({"uuids": "u1"}, "list of strings"),
        ({"expr": "x", "uuids": ["u1"]}, "must be"),
    ],
)
def test_resolve_errors_name_what_was_wrong(spec: dict, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        resolve(spec, AGENTS)


def test_target_spec_from_python_values() -> None:
    import pandas as pd

    assert target_spec("web-*") == {"expr": "web-*"}
    assert target_spec(["a", "b"]) == {"uuids": ["a", "b"]}
    assert target_spec(pd.DataFrame({"uuid": ["a"], "x": [1]})) == {"uuids": ["a"]}
    assert target_spec(pd.Series(["a"])) == {"uuids": ["a"]}


def test_spool_claims_a_taskid_once_and_forgets_only_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    assert spool.claim("t1", "shell") is True
    assert spool.claim("t1", "shell") is False
    spool.append([{"t": "out", "taskid": "t1", "seq": 1, "p": {}}, {"t": "done", "taskid": "t1", "seq": 2, "p": {}}])
    spool.append([{"t": "out", "taskid": "t1", "seq": 1, "p": {}}])  # a duplicate is ignored
    assert len(spool.pending_after(0)) == 2
    spool.ack([["t1", 1]])
    assert [f for _, f in spool.pending_after(0)] == [encode_frame({"t": "done", "taskid": "t1", "seq": 2, "p": {}})]
    spool.set_pgid("t1", 4242)
    assert [i[:3] for i in spool.interrupted()] == [("t1", "shell", 4242)]
    spool.finish("t1", [])
    spool.close()
    reopened = Spool(tmp_path / "spool.db")  # survives a restart
    assert reopened.claim("t1", "shell") is False
    assert reopened.unacked() == 1 and reopened.interrupted() == []
    reopened.close()


def test_e2e_keys_agree_and_macs_catch_alteration() -> None:
    from hcsdk.protocol.e2e import derive_key, new_keypair, sign, verify
    from hcsdk.protocol.wire import loads

    m_priv, m_pub = new_keypair()
    a_priv, a_pub = new_keypair()
    key = derive_key(a_priv, m_pub, "agent-1")
    assert key == derive_key(m_priv, a_pub, "agent-1")
    assert key != derive_key(m_priv, a_pub, "agent-2")
    msg = sign(key, {"t": "task", "uuid": "agent-1", "cmd": "shell", "taskid": "r1.0", "seq": 0,
                     "p": {"args": {"script": "echo ünïcode"}, "timeout": 1.5, "exp": 1e9}})
    wire = loads(encode_frame(msg)[4:])  # through orjson and back
    assert verify(key, wire)
    for field, value in (("cmd", "exec"), ("taskid", "r1.1"), ("uuid", "agent-2")):
        assert not verify(key, {**wire, field: value})
    assert not verify(key, {**wire, "p": {**wire["p"], "args": {"script": "rm -rf /"}}})
    assert not verify(key, {k: v for k, v in wire.items() if k != "m"})


def test_samples_are_stored_once_per_tick_and_forgotten_after_retention(tmp_path: Path) -> None:
    from master.store import SQLiteStore as Store

    store = Store(tmp_path / "m.db")

    def sample(seq: int, when: float) -> tuple[str, Sample]:
        return "u1", Sample(uuid="u1", taskid="sample:s:1", seq=seq, series="s", time=when, status=TaskStatus.OK,
                            fields={"v": seq})

    acks, _ = store.ingest([sample(1, 100.0), sample(1, 100.0), sample(2, 5_000.0)])
    assert acks == {"u1": [["sample:s:1", 1], ["sample:s:1", 1], ["sample:s:1", 2]]}  # all acked
    assert [r["fields"] for r in store.series("s", None, None, 10)] == [{"v": 1}, {"v": 2}]
    assert store.forget_samples(1_000.0) == 1
    assert [r["time"] for r in store.series("s", None, None, 10)] == [5_000.0]
    store.close()


@pytest.mark.parametrize(("text", "expected"), [
    ("500ms", 0.5), ("10s", 10.0), (" 1.5 m ", 90.0), ("24h", 86400.0), ("7D", 604800.0), ("30", 30.0), (2, 2.0),
])
def test_durations_read_as_people_write_them(text: str | float, expected: float) -> None:
    assert seconds(text) == expected


@pytest.mark.parametrize("text", ["", "10 minutes", "-5s", "1h30m", "s"])
def test_what_is_not_a_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        seconds(text)
