"""Proxies on loopback: relay, chains, failover, and relays that lie (end-to-end MACs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from fleet import Fleet, wait_for

#: a real proxy whose relay lies (test-only: wraps the relay, see the module)
TAMPERING_PROXY = Path(__file__).with_name("tampering_proxy.py")


def _via(fleet: Fleet, name: str) -> list[str]:
    inv = fleet.client.inventory().set_index("hostname")
    return list(inv.loc[name, "via"]) if name in inv.index and inv.loc[name, "online"] else []


def test_agent_behind_a_proxy_runs_commands_and_shows_its_path(fleet: Fleet) -> None:
    hk = fleet.start_proxy("hk-proxy")
    fleet.start_agent("th-1", extra=["--master", hk])
    fleet.start_agent("direct-1")
    fleet.wait_online("th-1", "direct-1", "hk-proxy")
    inv = fleet.client.inventory().set_index("hostname")
    assert inv.loc["hk-proxy", "kind"] == "proxy" and inv.loc["th-1", "kind"] == "agent"
    assert list(inv.loc["th-1", "via"]) == ["hk-proxy"] and list(inv.loc["direct-1", "via"]) == []
    df = fleet.client.run("echo hello $ZY_HOSTNAME", targets="*", timeout=30).to_dataframe()
    assert sorted(df["stdout"]) == ["hello direct-1\n", "hello th-1\n"]  # proxies are never targets
    run = fleet.client.run("sleep 300", targets="th-1", timeout=600)
    wait_for(lambda: fleet.client.run("true", targets="th-1", timeout=30).to_dataframe().loc[0, "status"] == "ok",
             20, "a second command through the proxy while the first runs")
    assert run.cancel() == 1
    assert run.to_dataframe().loc[0, "status"] == "cancelled"


def test_a_chain_of_three_proxies(fleet: Fleet) -> None:
    hk = fleet.start_proxy("hk")
    sg = fleet.start_proxy("sg", upstreams=[hk])
    th = fleet.start_proxy("th", upstreams=[sg])
    fleet.start_agent("far-1", extra=["--master", th])
    fleet.wait_online("far-1")
    assert _via(fleet, "far-1") == ["hk", "sg", "th"]
    assert _via(fleet, "th") == ["hk", "sg"]
    df = fleet.client.run("for i in 1 2 3; do echo $i; done", targets="far-1", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "1\n2\n3\n"


def test_failover_to_another_proxy_mid_run_loses_nothing(fleet: Fleet, tmp_path: Path) -> None:
    urls = {"pa": fleet.start_proxy("pa"), "pb": fleet.start_proxy("pb")}
    fleet.start_agent("fo-1", extra=["--master", urls["pa"], "--master", urls["pb"]])
    fleet.wait_online("fo-1")
    first = _via(fleet, "fo-1")[0]
    marker = tmp_path / "started"
    run = fleet.client.run(f"touch {marker}; sleep 2; echo survived", targets="fo-1", timeout=120)
    wait_for(marker.exists, 20, "the command to start")
    fleet.agents[first].kill()  # the proxy the agent uses dies mid-run
    df = run.to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "survived\n"
    other = "pb" if first == "pa" else "pa"
    wait_for(lambda: _via(fleet, "fo-1") == [other], 30, "the agent to show its new path")


def test_agents_spread_over_proxies_given_by_flag_or_by_join_token(fleet: Fleet) -> None:
    urls = [fleet.start_proxy("s1"), fleet.start_proxy("s2")]
    names = [f"sp-{i}" for i in range(8)]
    for name in names[:4]:
        fleet.start_agent(name, extra=[arg for url in urls for arg in ("--proxy", url)])
    fleet._token = fleet.client.create_join_token(ttl=600, proxies=urls)["token"]  # proxies in the token
    for name in names[4:]:
        fleet.start_agent(name)
    fleet.wait_online(*names)
    used = {_via(fleet, n)[0] for n in names}
    assert used == {"s1", "s2"}, "agents should not all pick the first proxy"


def test_master_restart_behind_a_proxy_loses_no_result(fleet: Fleet) -> None:
    edge = fleet.start_proxy("edge")
    names = [f"r-{i}" for i in range(5)]
    for name in names:
        fleet.start_agent(name, extra=["--master", edge])
    fleet.wait_online(*names)
    run = fleet.client.run("sleep 1.5; echo done", targets="r-*", timeout=120)
    wait_for(lambda: fleet.client._async is not None and _started(fleet, run.id) == 5, 20, "commands to start")
    fleet.restart_master(kill=True)
    df = run.to_dataframe()
    assert (df["status"] == "ok").all() and (df["stdout"] == "done\n").all(), df
    fleet.wait_online(*names, timeout=60)


def _started(fleet: Fleet, run_id: str) -> int:
    from hcsdk._portal import portal

    info: Any = portal().call(fleet.client._async._link.request, "GET", f"/api/v1/runs/{run_id}")
    return sum(1 for t in info["tasks"] if t["started_at"])


@pytest.fixture
def evil(fleet: Fleet, request: pytest.FixtureRequest) -> Fleet:
    """An agent whose only way to the master is a relay that lies in the given way."""
    fleet.master_args = [*fleet.master_args]
    url = fleet.start_proxy("evil", wrap=[sys.executable, str(TAMPERING_PROXY), request.param])
    fleet.start_agent("victim", extra=["--master", url])
    fleet.wait_online("victim")
    return fleet


@pytest.mark.parametrize("evil", ["alter-command"], indirect=True)
def test_an_altered_command_is_refused_by_the_agent(evil: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    df = evil.client.run(f"touch {marker}", targets="victim", timeout=5).to_dataframe()
    assert df.loc[0, "status"] == "error" and "MAC" in df.loc[0, "error"]
    assert not marker.exists() and "tampered" not in df.loc[0, "stdout"]


@pytest.mark.parametrize("evil", ["forge-command"], indirect=True)
def test_a_forged_command_is_refused_and_the_real_one_runs(evil: Fleet) -> None:
    uuid = evil.uuid_of("victim")
    df = evil.client.run("echo real", targets="victim", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "real\n"
    assert not Path(f"/tmp/zy-forged-{uuid}").exists()


@pytest.mark.parametrize("evil", ["replay-command"], indirect=True)
def test_a_replayed_command_runs_once(evil: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "count"
    df = evil.client.run(f"echo once >> {marker}", targets="victim", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok"
    assert marker.read_text() == "once\n"


@pytest.mark.parametrize("evil", ["alter-result"], indirect=True)
def test_an_altered_result_is_rejected_by_the_master(evil: Fleet) -> None:
    df = evil.client.run("echo genuine", targets="victim", timeout=3).to_dataframe()
    assert "tampered" not in df.loc[0, "stdout"]
    assert evil.client.status()["rejected"] >= 1


@pytest.mark.parametrize("evil", ["forge-result"], indirect=True)
def test_a_forged_result_is_rejected_and_the_real_one_counts(evil: Fleet) -> None:
    df = evil.client.run("echo genuine; sleep 0.5", targets="victim", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "genuine\n"
    assert evil.client.status()["rejected"] >= 2


@pytest.mark.parametrize("evil", ["replay-result"], indirect=True)
def test_replayed_results_count_once(evil: Fleet) -> None:
    df = evil.client.run("echo one; echo two", targets="victim", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "one\ntwo\n"
