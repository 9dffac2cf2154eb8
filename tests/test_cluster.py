"""Several masters on one PostgreSQL (issue 15), with real processes: masters, agents, a swarm,
the SDK, and a throwaway PostgreSQL (the ``pg_url`` fixture)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import Fleet, wait_for

#: short graces so that what a test waits for shows within seconds
ARGS = ["--offline-grace", "4", "--heartbeat", "2"]


@pytest.fixture
def fl(tmp_path: Path, pg_url: str) -> Iterator[Fleet]:
    """Masters a and b on one PostgreSQL store, no agents yet."""
    fleet = Fleet(tmp_path, ARGS, store=pg_url)
    try:
        fleet.start_master()
        fleet.start_master(name="b")
        yield fleet
    finally:
        fleet.close()


def holders(fleet: Fleet) -> dict[str, int]:
    """Master name -> agents held, from `zy master cluster`."""
    names = {m.master_id: n for n, m in fleet.masters.items()}
    return {names.get(str(r["id"]), str(r["id"])): int(str(r["agents"])) for r in fleet.cluster() if r["alive"]}


def test_a_run_made_on_b_reaches_an_agent_on_a_and_fills_in_from_b(fl: Fleet) -> None:
    fl.start_agent("web-1", {"role": "web"}, master="a")
    fl.wait_online("web-1")  # (through a, which holds it)
    b = fl.masters["b"].client
    wait_for(lambda: holders(fl).get("a") == 1, 30, "a to report its agent")
    run = b.run("echo from-$(hostname)-ok; echo err >&2", targets="label:role=web", timeout=30)
    df = run.to_dataframe()
    assert len(df) == 1 and df["status"].tolist() == ["ok"], df
    assert df["stdout"].iloc[0].endswith("-ok\n") and df["stderr"].iloc[0] == "err\n"
    assert df["hostname"].tolist() == ["web-1"]
    # the agent never moved: a sent the task and stored its result; b read the events by cursor
    assert holders(fl) == {"a": 1, "b": 0}


def swarm_on_a(fl: Fleet, count: int, name: str = "sw") -> None:
    """``count`` swarm agents, all on master a, whose join token names b too (their failover).

    Agents start at a random URL of their token, so b is away while they connect: its token
    URLs are b's (it is live when the token is made), and b comes back on the same port."""
    b = fl.masters["b"]
    fl.masters["a"].token  # noqa: B018 - made while b is live, so it lists a then b
    fl.stop_master("b")
    fl.start_swarm(count, name, master="a")
    wait_for(lambda: fl.online_count(name) == count, 90, f"{count} swarm agents on a")
    fl.start_master(b.port, name="b")
    wait_for(lambda: "b" in holders(fl), 30, "b back in the cluster")
    assert holders(fl) == {"a": count, "b": 0}


def test_sigkill_of_master_a_mid_run_moves_its_agents_to_b_and_loses_nothing(fl: Fleet, tmp_path: Path) -> None:
    count = 20
    swarm_on_a(fl, count)
    ran = tmp_path / "ran.log"
    b = fl.masters["b"].client
    run = b.run(f"echo $ZY_TASKID >> {ran}; sleep 6; echo ok-$ZY_TASKID", targets="sw-*", timeout=120)
    seen: list[str] = []
    errors: list[BaseException] = []

    def follow() -> None:  # the SDK's stream on b, from before the kill to the end
        try:
            for event in run.events():
                seen.append(event.kind)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    import threading

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    wait_for(lambda: ran.exists() and len(ran.read_text().split()) == count, 60, "every task started on a")
    fl.kill_master("a")
    follower.join(180)
    assert not follower.is_alive(), "the stream on b did not end"
    assert not errors, errors
    df = run.to_dataframe()
    assert len(df) == count and (df["status"] == "ok").all(), df[["hostname", "status", "error"]]
    assert sorted(df["stdout"]) == sorted(f"ok-{t}\n" for t in df["taskid"])
    lines = ran.read_text().split()
    assert sorted(lines) == sorted(df["taskid"]), "a task ran twice or not at all"
    wait_for(lambda: holders(fl) == {"b": count}, 60, "every agent held by b")
    # b, now the singleton holder, found a dead and dropped it from the registry
    wait_for(lambda: [r["id"] for r in fl.cluster()] == [fl.masters["b"].master_id], 60, "a forgotten")
    fl.wait_singleton("b")
