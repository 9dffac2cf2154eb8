"""`zy swarm`: many real agents in one process, and the lean HTTP/2 channel under them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.memspool import MemorySpool
from fleet import Fleet
from hcsdk.localfleet import ZY, wait_for


def _online(fleet: Fleet, prefix: str) -> int:
    return fleet.online_count(prefix)


def test_a_swarm_enrolls_once_and_runs_echo_and_real_commands(fleet: Fleet) -> None:
    swarm = fleet.start_swarm(30, name="sw")
    wait_for(lambda: _online(fleet, "sw-") == 30, 120, "30 swarm agents online")
    df = fleet.client.run(cmd="echo", args={"text": "hi"}, targets="sw-*", timeout=30).to_dataframe()
    assert len(df) == 30 and (df["status"] == "ok").all(), df[["hostname", "status", "error"]]
    assert (df["stdout"] == "hi\n").all()
    df = fleet.client.run("echo real-$((20+1))", targets=["sw-00000", "sw-00029"], timeout=30).to_dataframe()
    assert list(df["stdout"]) == ["real-21\n", "real-21\n"] and (df["status"] == "ok").all()
    uuids = set(fleet.client.inventory()["uuid"])

    swarm.stop()  # a second start reconnects the same identities: no new enrollment
    again = fleet.start_swarm(30, name="sw")
    wait_for(lambda: "(0 newly enrolled)" in again.output(), 60, "the swarm to start without enrolling")
    wait_for(lambda: _online(fleet, "sw-") == 30, 120, "the same 30 agents back")
    assert set(fleet.client.inventory()["uuid"]) == uuids


def test_a_swarm_behind_a_proxy_is_reached_through_it(fleet: Fleet) -> None:
    url = fleet.start_proxy("edge")
    fleet.start_swarm(10, name="far", urls=[url])
    wait_for(lambda: _online(fleet, "far-") == 10, 120, "10 agents behind the proxy")
    inv = fleet.client.inventory()
    far = inv[inv["hostname"].str.startswith("far-")]
    assert all(v == ["edge"] for v in far["via"]), far["via"]
    df = fleet.client.run(cmd="echo", args={"text": "via"}, targets="far-*", timeout=30).to_dataframe()
    assert (df["status"] == "ok").all() and (df["stdout"] == "via\n").all()


def test_a_message_larger_than_the_flow_control_windows_crosses_both_ways(fleet: Fleet) -> None:
    """3 MiB down and back up: more than granian's 1 MiB stream window, so the agent's uplink
    must wait for WINDOW_UPDATEs, and the downlink must be reassembled from many DATA frames."""
    fleet.start_agent("big")
    fleet.wait_online("big")
    text = "0123456789abcdef" * (3 * 1024 * 1024 // 16)
    df = fleet.client.run(cmd="echo", args={"text": text}, targets="big", timeout=60).to_dataframe()
    assert df.loc[0, "status"] == "ok", df.loc[0, "error"]
    assert df.loc[0, "stdout"] == text + "\n"


def test_echo_refuses_a_text_that_is_not_a_string(fleet: Fleet) -> None:
    fleet.start_agent("e1")
    fleet.wait_online("e1")
    df = fleet.client.run(cmd="echo", args={"text": 42}, targets="e1", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "error" and "args.text" in df.loc[0, "error"]


def test_swarm_without_a_token_for_new_agents_says_so(tmp_path: Path) -> None:
    proc = subprocess.run([*ZY, "swarm", "--agents", "3", "--state-dir", str(tmp_path),
                           "--proxy", "https://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "3 of 3 agents are not enrolled yet: pass --join-file PATH (or ZY_JOIN_TOKEN=TOKEN)" in proc.stderr


def test_memory_spool_keeps_the_spool_contract() -> None:
    spool = MemorySpool()
    msg = {"t": "start", "uuid": "u", "cmd": "echo", "taskid": "t1", "seq": 0, "p": {}}
    spool.append([msg, msg])  # a resend of the same (taskid, seq) is kept once
    spool.finish("t1", [{**msg, "t": "done", "seq": 1}])
    rows = spool.pending_after(0)
    assert [r[0] for r in rows] == [1, 2] and spool.finished == 1
    assert spool.pending_after(1) == rows[1:]
    spool.ack([["t1", 0]])
    assert [r[0] for r in spool.pending_after(0)] == [2]
    assert spool.claim("t2", "echo") and not spool.claim("t2", "echo")


def test_beyond_the_handshake_queue_agents_get_busy_and_retry(tmp_path: Path) -> None:
    """Admission: a master whose queue is full answers 503 `busy`; the agent keeps retrying
    (backing off) instead of giving up, and the refusals are counted."""
    fleet = Fleet(tmp_path, ["--handshake-queue", "0"])
    fleet.start_master()
    try:
        agent = fleet.start_agent("patient")
        wait_for(lambda: "503" in agent.output() and "busy" in agent.output(), 60, "a 503 busy answer")
        assert agent.alive and "patient" not in fleet.online()
        assert fleet.client.status()["busy"] >= 1
    finally:
        fleet.close()


def test_one_h2_connection_carries_more_requests_than_the_server_stream_limit(fleet: Fleet) -> None:
    """A proxy forwards a reconnect storm's handshakes over its one upstream connection: more
    at once than the master's 256-stream limit must wait for a slot, not fail."""
    import asyncio

    from hcsdk.net.h2conn import H2Connection
    from hcsdk.net.tls import shared_client_context

    async def burst() -> tuple[int, set[int]]:
        ca = (fleet.root / "master" / "ca.pem").read_bytes()
        conn = await H2Connection.open(fleet.url, shared_client_context(ca), {})
        try:
            answers = await asyncio.gather(*[conn.request("GET", "/v1/ca") for _ in range(600)])
            return conn.h2.remote_settings.max_concurrent_streams, {a.status_code for a in answers}
        finally:
            conn.close()

    limit, statuses = asyncio.run(burst())
    assert limit < 600 and statuses == {200}
