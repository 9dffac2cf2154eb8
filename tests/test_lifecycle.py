"""Processes that die, restart, time out and get cancelled; nothing may be lost or orphaned."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from fleet import Fleet, wait_for
from hcsdk.localfleet import pid_alive


def test_enroll_once_then_reconnect_as_the_same_uuid(fleet: Fleet) -> None:
    agent = fleet.start_agent("box-1", {"role": "app"})
    fleet.wait_online("box-1")
    uuid = fleet.uuid_of("box-1")
    agent.stop()
    fleet.wait_offline("box-1")
    fleet.start_agent("box-1", join=False)  # no token: the state dir holds the identity
    fleet.wait_online("box-1")
    inv = fleet.client.inventory()
    assert list(inv["uuid"]) == [uuid]
    assert inv.loc[0, "connects"] >= 2
    assert inv.loc[0, "labels"] == {"role": "app"}


def test_timeout_kills_the_whole_process_group(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start_agent("t-1")
    fleet.wait_online("t-1")
    pidfile = tmp_path / "bg.pid"
    script = f"sleep 300 & echo $! > {pidfile}; sleep 300"
    df = fleet.client.run(script, targets="t-1", timeout=1.5).to_dataframe()
    assert df.loc[0, "status"] == "timeout"
    assert "timeout" in df.loc[0, "error"]
    bg = int(pidfile.read_text())
    wait_for(lambda: not pid_alive(bg), 10, "background child to be killed")


def test_cancel_stops_the_command_on_every_target(fleet: Fleet, tmp_path: Path) -> None:
    for name in ("c-1", "c-2"):
        fleet.start_agent(name)
    fleet.wait_online()
    # each target leaves the pids of its shell and of a background child
    script = f'sleep 300 & echo "$$ $!" > {tmp_path}/$ZY_HOSTNAME.pid; wait'
    run = fleet.client.run(script, targets="c-*", timeout=600)
    wait_for(lambda: len(list(tmp_path.glob("*.pid"))) == 2, 20, "both commands to start")
    assert run.cancel() == 2
    df = run.to_dataframe()
    assert list(df["status"]) == ["cancelled", "cancelled"]
    pids = [int(p) for f in tmp_path.glob("*.pid") for p in f.read_text().split()]
    assert len(pids) == 4
    for pid in pids:
        wait_for(lambda p=pid: not pid_alive(p), 10, "the whole process group to die")  # type: ignore[misc]


def test_offline_targets_end_offline_at_once(fleet: Fleet) -> None:
    fleet.start_agent("on-1")
    gone = fleet.start_agent("off-1")
    fleet.wait_online()
    gone.stop()
    fleet.wait_offline("off-1")
    run = fleet.client.run("sleep 0.5; echo ok", targets="o*", timeout=30)
    # decided when the run was created, not after a wait
    assert {t["hostname"]: t["status"] for t in _run_info(fleet, run.id)["tasks"]}["off-1"] == "offline"
    df = run.to_dataframe()
    by_host = df.set_index("hostname")
    assert by_host.loc["off-1", "status"] == "offline"
    assert by_host.loc["on-1", "status"] == "ok"


def test_agent_killed_mid_run_ends_error_not_hanging(fleet: Fleet) -> None:
    victim = fleet.start_agent("k-1")
    fleet.start_agent("k-2")
    fleet.wait_online()
    run = fleet.client.run("sleep 120", targets="k-*", timeout=600)
    wait_for(lambda: _started(fleet, run.id) == 2, 20, "tasks to start")
    victim.kill()
    # the master notices the dead channel by itself; the survivor is still running; cancel it so the run can complete
    wait_for(lambda: _status(fleet, run.id, "k-1") in ("error", "offline"), 30, "dead agent's row to end")
    run.cancel()
    df = run.to_dataframe()
    by_host = df.set_index("hostname")
    assert by_host.loc["k-1", "status"] in ("error", "offline")
    assert by_host.loc["k-2", "status"] == "cancelled"


def test_agent_restarted_mid_task_never_runs_it_twice(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.start_agent("x-1")
    fleet.wait_online()
    marker, pidfile = tmp_path / "runs.txt", tmp_path / "x.pid"
    run = fleet.client.run(f"echo ran >> {marker}; echo $$ > {pidfile}; sleep 300", targets="x-1", timeout=600)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "task to start")
    agent.kill()  # a crash: the task's shell is left behind for the new agent to find
    fleet.start_agent("x-1", join=False)
    # the restarted agent reports the truth: it knows it was restarted (this overrides any
    # "went offline" the master may have presumed meanwhile)
    wait_for(lambda: "restarted" in str(_run_info(fleet, run.id)["tasks"][0]["error"]), 30, "agent's verdict")
    assert _run_info(fleet, run.id)["tasks"][0]["status"] == "error"
    assert run.to_dataframe().loc[0, "status"] in ("error", "offline")
    assert marker.read_text() == "ran\n", "the task must never run a second time"
    wait_for(lambda: not pid_alive(int(pidfile.read_text())), 20, "the orphaned shell to be killed")


def test_results_made_while_the_master_is_down_come_from_the_spool(fleet: Fleet, tmp_path: Path) -> None:
    for i in range(2):
        fleet.start_agent(f"s-{i}")
    fleet.wait_online()
    done = tmp_path / "done"
    done.mkdir()
    run = fleet.client.run(f"sleep 1; echo produced; touch {done}/$ZY_HOSTNAME", targets="s-*", timeout=120)
    wait_for(lambda: _started(fleet, run.id) == 2, 20, "tasks to start")
    assert fleet.master is not None
    fleet.master.kill()
    wait_for(lambda: len(list(done.iterdir())) == 2, 20, "both commands to finish while the master is down")
    time.sleep(0.5)  # their final messages are spooled, with nobody to send them to
    fleet.restart_master(kill=True)
    df = run.to_dataframe()
    assert (df["status"] == "ok").all(), df
    assert (df["stdout"] == "produced\n").all()


def test_master_killed_mid_run_loses_no_result(fleet: Fleet) -> None:
    for i in range(3):
        fleet.start_agent(f"m-{i}")
    fleet.wait_online()
    run = fleet.client.run("sleep 2; echo finished", targets="m-*", timeout=120)
    wait_for(lambda: _started(fleet, run.id) == 3, 20, "tasks to start")
    fleet.restart_master(kill=True)  # SIGKILL: no goodbye to anyone
    df = run.to_dataframe()  # the SDK resumes its event stream after the restart
    assert (df["status"] == "ok").all(), df
    assert (df["stdout"] == "finished\n").all()
    fleet.wait_online()
    assert (fleet.client.run("echo again", targets="m-*", timeout=30).to_dataframe()["status"] == "ok").all()


def test_server_initiated_disconnect_is_a_reconnect_that_loses_nothing(fleet: Fleet) -> None:
    fleet.start_agent("d-1")
    fleet.wait_online()
    uuid = fleet.uuid_of("d-1")
    run = fleet.client.run("sleep 1.5; echo survived", targets="d-1", timeout=60)
    wait_for(lambda: _started(fleet, run.id) == 1, 20, "task to start")
    fleet.client.disconnect_agent(uuid)
    df = run.to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "survived\n"
    wait_for(lambda: fleet.client.inventory().loc[0, "connects"] >= 2, 30, "agent to reconnect")


def test_graceful_master_restart_goaway_loses_nothing(fleet: Fleet) -> None:
    fleet.start_agent("g-1")
    fleet.wait_online()
    run = fleet.client.run("sleep 1.5; echo after-goaway", targets="g-1", timeout=60)
    wait_for(lambda: _started(fleet, run.id) == 1, 20, "task to start")
    fleet.restart_master(kill=False)  # SIGTERM: granian closes connections with GOAWAY
    df = run.to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "after-goaway\n", df.loc[0, "error"]


def test_no_http2_master_falls_back_to_polling(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["--no-http2", "--offline-grace", "2"])
    fleet.start_master()
    try:
        fleet.start_agent("p-1")
        fleet.start_agent("p-2")
        fleet.wait_online()
        inv = fleet.client.inventory()
        assert set(inv["mode"]) == {"poll"}
        df = fleet.client.run("for i in 1 2 3; do echo $i; done", targets="p-*", timeout=30).to_dataframe()
        assert (df["status"] == "ok").all() and (df["stdout"] == "1\n2\n3\n").all()
        run = fleet.client.run("sleep 300", targets="p-1", timeout=600)
        wait_for(lambda: _started(fleet, run.id) == 1, 20, "task to start over polling")
        run.cancel()
        assert run.to_dataframe().loc[0, "status"] == "cancelled"
    finally:
        fleet.close()


def test_polling_agent_returns_to_http2_when_it_is_back(fleet: Fleet) -> None:
    """The agent starts against an HTTP/1.1-only master, then the master comes back with h2."""
    assert fleet.master is not None
    fleet.master.stop()
    fleet.start_master(fleet.port, ["--no-http2"])
    fleet.start_agent("b-1")
    fleet.wait_online()
    assert fleet.client.inventory().loc[0, "mode"] == "poll"
    fleet.restart_master(kill=False)  # same port, h2 allowed again (no --no-http2 this time)
    wait_for(lambda: fleet.client.inventory().loc[0, "mode"] == "h2", 40, "agent back on HTTP/2")


@pytest.mark.slow
def test_idle_channel_outlives_every_timeout(tmp_path: Path) -> None:
    """Default heartbeats and server limits: a channel idle for 40 s must not be dropped."""
    fleet = Fleet(tmp_path)
    fleet.start_master()
    try:
        state = tmp_path / "agents" / "idle-1"
        from fleet import ZY, Proc

        argv = [*ZY, "agent", "--state-dir", str(state), "--hostname", "idle-1", "--join", fleet.token]
        fleet.agents["idle-1"] = Proc("idle-1", argv, tmp_path / "agent-idle-1.log", fleet.env)
        fleet.wait_online()
        time.sleep(40)
        inv = fleet.client.inventory()
        assert inv.loc[0, "connects"] == 1, fleet.logs()
        df = fleet.client.run("echo still-here", targets="idle-1", timeout=30).to_dataframe()
        assert df.loc[0, "stdout"] == "still-here\n"
        assert fleet.client.inventory().loc[0, "connects"] == 1
    finally:
        fleet.close()


def _run_info(fleet: Fleet, run_id: str) -> Any:
    from hcsdk._portal import portal

    return portal().call(fleet.client._async._link.request, "GET", f"/api/v1/runs/{run_id}")


def _started(fleet: Fleet, run_id: str) -> int:
    info = _run_info(fleet, run_id)
    return sum(1 for t in info["tasks"] if t["started_at"])


def _status(fleet: Fleet, run_id: str, hostname: str) -> str | None:
    info = _run_info(fleet, run_id)
    for t in info["tasks"]:
        if t["hostname"] == hostname:
            return t["status"]
    return None


def test_a_silent_dead_link_is_noticed_by_both_sides_and_healed(tmp_path: Path) -> None:
    """No FIN, no RST: the path just goes quiet. Heartbeats must notice within dead-after."""
    from faultproxy import FaultProxy

    fleet = Fleet(tmp_path, ["--heartbeat", "1", "--dead-after", "4", "--offline-grace", "30"])
    fleet.start_master()
    link = FaultProxy("127.0.0.1", fleet.port)
    try:
        agent = fleet.start_agent("silent-1", extra=["--master", link.url, "--dead-after", "4"])
        fleet.wait_online()
        link.blackhole()
        fleet.wait_offline("silent-1", timeout=20)  # the master gave up on the channel
        wait_for(lambda: "nothing from the master" in agent.output(), 20, "the agent to notice")
        link.heal()
        fleet.wait_online("silent-1", timeout=30)
        assert fleet.client.inventory().loc[0, "connects"] >= 2
        df = fleet.client.run("echo back", targets="silent-1", timeout=30).to_dataframe()
        assert df.loc[0, "stdout"] == "back\n"
    finally:
        link.close()
        fleet.close()


@pytest.mark.anyio
async def test_polling_agent_probes_for_http2_in_the_background(fleet: Fleet) -> None:
    """The probe the agent runs while polling: against a master that speaks h2 it asks to switch."""
    from hcsdk.net.channel import Channel, ChannelSettings, SwitchToH2

    ca = (fleet.root / "master" / "ca.pem").read_bytes()
    channel = Channel("probe", "x", [fleet.url], ca, facts=dict, labels={}, outbox=lambda _: [],
                      on_message=lambda _: None, wake=lambda: None,  # type: ignore[arg-type,return-value]
                      settings=ChannelSettings(h2_retry=0.1))
    with pytest.raises(SwitchToH2):
        with anyio.fail_after(20):
            await channel._probe_h2(fleet.url)
