"""Scheduled collection on real agents: samples as a time-indexed DataFrame, schedules that
outlive agent restarts, samples that outlive a master outage, listing and cancelling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from fleet import Fleet, wait_for
from hcsdk import Client, RequestError, TargetError, UsageError

COUNTER = 'n=$(cat "$ZY_STATE" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$ZY_STATE"; echo "{\\"n\\": $n}"'


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("schedule"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    for name in ("s-1", "s-2"):
        fleet.start_agent(name, {"role": "sched"})
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def _series_when(client: Client, name: str, ready: Callable[[pd.DataFrame], bool], what: str) -> pd.DataFrame:
    def check() -> tuple[pd.DataFrame] | None:
        df = client.series(name)
        return (df,) if ready(df) else None  # a DataFrame has no truth value: wait_for needs one

    result: pd.DataFrame = wait_for(check, what=what)[0]
    return result


def _per_agent(df: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in df.groupby("hostname").size().items()}


def test_samples_come_back_as_a_time_indexed_dataframe(fl: Fleet, tmp_path: Path) -> None:
    client = fl.client
    script = COUNTER.replace("$ZY_STATE", str(tmp_path / "count-$ZY_UUID"))
    sched = client.schedule("shell", every="1s", targets="label:role=sched", args={"script": script},
                            name="counter")
    assert sched.name == "counter" and sched.every == 1.0
    assert list(sched.agents()["status"]) == ["ok", "ok"]
    df = _series_when(client, "counter", lambda d: len(_per_agent(d)) == 2 and min(_per_agent(d).values()) >= 3,
                      "three samples from each agent")
    assert isinstance(df.index, pd.DatetimeIndex) and str(df.index.tz) == "UTC" and df.index.name == "time"
    assert {"uuid", "hostname", "status", "n"} <= set(df.columns)
    assert set(df["status"]) == {"ok"}
    for _, rows in df.groupby("hostname"):
        counts = list(rows["n"])
        assert counts == sorted(counts) and len(set(counts)) == len(counts)  # one sample per run
    # samples from different agents share ticks: the schedule is aligned to the period
    assert len(set(df.index[df["hostname"] == "s-1"]) & set(df.index[df["hostname"] == "s-2"])) >= 2


def test_a_plugin_result_is_a_samples_fields(fl: Fleet, tmp_path: Path) -> None:
    watched = tmp_path / "app.conf"
    watched.write_text("threads=8\n")
    client = fl.client
    client.schedule("file.read", every=1, targets="s-1", args={"path": str(watched)}, name="conf")
    # (a run may time out on a loaded machine: its 1 s period is its timeout; those samples say so)
    df = _series_when(client, "conf", lambda d: (d["status"] == "ok").sum() >= 2, "two samples")
    df = df[df["status"] == "ok"]
    assert set(df["size"]) == {10} and set(df["hostname"]) == {"s-1"}
    assert {"sha256", "truncated", "path"} <= set(df.columns)


def test_bad_schedules_are_clear_errors(fl: Fleet) -> None:
    client = fl.client
    with pytest.raises(UsageError, match="under a second"):
        client.schedule("echo", every="500ms", targets="s-1")
    with pytest.raises(UsageError, match="give a period like"):
        client.schedule("echo", every="often", targets="s-1")
    with pytest.raises(RequestError, match="cannot be scheduled"):
        client.schedule("zy.plugins", every="5s", targets="s-1")
    sched = client.schedule("no.such", every="5s", targets="s-1", name="nothing")
    agents = sched.agents()
    assert agents.loc[0, "status"] == "error" and "this agent has no such command" in agents.loc[0, "error"]
    sched.cancel()


def test_schedules_survive_an_agent_restart_and_are_listed(fl: Fleet) -> None:
    client = fl.client
    client.schedule("echo", every="1s", targets="s-2", args={"text": "7"}, name="seven")
    wait_for(lambda: len(client.series("seven")) >= 1, what="a first sample")
    fl.agents["s-2"].stop()
    stopped = len(client.series("seven"))
    fl.start_agent("s-2", {"role": "sched"})
    fl.wait_online("s-2")
    wait_for(lambda: len(client.series("seven")) >= stopped + 2, what="samples from the restarted agent")
    df = client.series("seven")
    assert set(df["value"]) == {7}
    listing = client.schedules().set_index("name")
    assert listing.loc["seven", "cmd"] == "echo" and listing.loc["seven", "every"] == 1.0
    assert listing.loc["seven", "samples"] >= stopped + 2


def test_no_sample_is_lost_while_the_master_is_away(fl: Fleet) -> None:
    client = fl.client
    client.schedule("echo", every="1s", targets="s-1", args={"text": "1"}, name="steady")
    wait_for(lambda: len(client.series("steady")) >= 2, what="samples before the outage")
    fl.restart_master()
    fl.wait_online("s-1", timeout=60)
    wait_for(lambda: len(client.series("steady")) >= 12, what="samples after the outage")
    times = [t.timestamp() for t in client.series("steady").index]
    gaps = [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]
    assert set(gaps) == {1}, f"ticks missing: {gaps}"  # every tick of the outage arrived from the spool


def test_cancel_stops_the_agents_and_keeps_the_samples(fl: Fleet) -> None:
    client = fl.client
    sched = client.schedule("echo", every="1s", targets="label:role=sched", args={"text": "3"}, name="brief")
    wait_for(lambda: len(client.series("brief")) >= 2, what="samples")
    answer = sched.cancel()
    assert answer["name"] == "brief"
    assert "brief" not in set(client.schedules()["name"])
    run = answer["run"]["run_id"]
    wait_for(lambda: client.run(cmd="zy.schedules", args={}, targets="label:role=sched", timeout=30)
             .to_dataframe()["result"].map(lambda r: "brief" not in {s["name"] for s in r["schedules"]}).all(),
             what=f"the agents to drop the schedule ({run})")
    settled = len(client.series("brief"))
    listing = client.run(cmd="zy.schedules", args={}, targets="s-1", timeout=30).to_dataframe()
    assert "brief" not in {s["name"] for s in listing.loc[0, "result"]["schedules"]}
    assert settled >= 2 and len(client.series("brief")) <= settled + 2  # in flight at most


def _agent_schedules(client: Client, name: str) -> set[str]:
    df = client.run(cmd="zy.schedules", args={}, targets=name, timeout=30).to_dataframe()
    return {s["name"] for s in (df.loc[0, "result"] or {}).get("schedules", [])}


def test_agents_catch_up_with_schedules_at_their_handshake(fl: Fleet) -> None:
    """An agent that joins later with matching labels gets the schedule; one that was away
    while a schedule was cancelled loses it when it comes back."""
    client = fl.client
    late = client.schedule("echo", every="1s", targets="label:tier=late", args={"text": "5"}, name="latecomer")
    assert late.agents().empty  # nothing matches yet: kept for agents that join
    fl.start_agent("s-3", {"role": "sched"})
    fl.wait_online("s-3")
    client.schedule("echo", every="1s", targets="label:role=sched", args={"text": "5"}, name="fleetwide")
    fl.start_agent("s-4", {"role": "sched", "tier": "late"})  # joins after both were set
    fl.wait_online("s-4")
    wait_for(lambda: "latecomer" in _agent_schedules(client, "s-4"), what="s-4 to get the label's schedule")
    with pytest.raises(TargetError, match="unknown target 'nope'"):
        client.schedule("echo", every="1s", targets=["nope"], name="nowhere")
    wait_for(lambda: "fleetwide" in _agent_schedules(client, "s-4"), what="s-4 to get the schedule")
    _series_when(client, "fleetwide", lambda d: "s-4" in set(d["hostname"]), "samples from s-4")

    fl.agents["s-3"].stop()
    client.cancel_schedule("fleetwide")
    fl.start_agent("s-3", {"role": "sched"})
    fl.wait_online("s-3")
    wait_for(lambda: "fleetwide" not in _agent_schedules(client, "s-3"), what="s-3 to drop the schedule")
    assert "fleetwide" not in _agent_schedules(client, "s-4")


def test_a_schedule_set_again_elsewhere_stops_where_it_no_longer_applies(fl: Fleet) -> None:
    client = fl.client
    bad = client.schedule("shell", every="5s", targets="s-1", args={"scrpt": "true"}, name="typo")
    assert "unknown argument scrpt" in bad.agents().loc[0, "error"]
    client.schedule("echo", every="1s", targets="s-1", args={"text": "1"}, name="moving")
    assert "moving" in _agent_schedules(client, "s-1")
    client.schedule("echo", every="1s", targets="s-2", args={"text": "2"}, name="moving")
    wait_for(lambda: "moving" not in _agent_schedules(client, "s-1"), what="s-1 to drop it")
    assert "moving" in _agent_schedules(client, "s-2")
    client.cancel_schedule("moving")
