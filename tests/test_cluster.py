"""Several masters on one PostgreSQL (issue 15), with real processes: masters, agents, a swarm,
the SDK, and a throwaway PostgreSQL (the ``pg_url`` fixture)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pg import PgServer

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


@contextmanager
def b_away(fl: Fleet) -> Iterator[None]:
    """Agents started in the block connect to master a, with b in their join token's URLs (their
    failover). Agents start at a random URL of their token, so b is stopped meanwhile (after a's
    tokens are made, while b is live, so that they list it) and comes back on its port after."""
    b = fl.masters["b"]
    fl.masters["a"].token  # noqa: B018 - made now, while b is live
    fl.token  # noqa: B018 - (the fleet's own, for start_agent: also a's)
    fl.stop_master("b")
    yield
    fl.start_master(b.port, name="b")
    wait_for(lambda: "b" in holders(fl), 30, "b back in the cluster")


def swarm_on_a(fl: Fleet, count: int, name: str = "sw") -> None:
    """``count`` swarm agents, all on master a, that fail over to b."""
    with b_away(fl):
        fl.start_swarm(count, name, master="a")
        wait_for(lambda: fl.online_count(name) == count, 90, f"{count} swarm agents on a")
    # (the registry's counts are the masters' last heartbeats')
    wait_for(lambda: holders(fl) == {"a": count, "b": 0}, 30, f"a to report {count} agents, b none")


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
    assert seen.count("done") == count and seen.count("start") == count, seen  # each once, none lost
    df = run.to_dataframe()
    assert len(df) == count and (df["status"] == "ok").all(), df[["hostname", "status", "error"]]
    assert sorted(df["stdout"]) == sorted(f"ok-{t}\n" for t in df["taskid"])
    lines = ran.read_text().split()
    assert sorted(lines) == sorted(df["taskid"]), "a task ran twice or not at all"
    wait_for(lambda: holders(fl) == {"b": count}, 60, "every agent held by b")
    # b, now the singleton holder, found a dead and dropped it from the registry
    wait_for(lambda: [r["id"] for r in fl.cluster()] == [fl.masters["b"].master_id], 60, "a forgotten")
    fl.wait_singleton("b")


def test_a_schedule_keeps_every_sample_across_the_death_of_its_agents_master(fl: Fleet) -> None:
    count = 3
    swarm_on_a(fl, count)
    b = fl.masters["b"].client
    b.schedule("echo", every="1s", targets="sw-*", args={"text": "1"}, name="steady")  # made on b, sent by a
    wait_for(lambda: len(b.series("steady")) >= 3 * count, 60, "samples through a")
    fl.kill_master("a")
    before = len(b.series("steady"))
    wait_for(lambda: holders(fl).get("b") == count, 90, "the agents on b")
    wait_for(lambda: len(b.series("steady")) >= before + 8 * count, 90, "samples through b")
    df = b.series("steady")
    for uuid, rows in df.groupby("uuid"):
        times = sorted(t.timestamp() for t in rows.index)
        gaps = {round(y - x, 3) for x, y in zip(times, times[1:], strict=False)}
        assert gaps == {1}, f"{uuid}: ticks missing or doubled across a's death: {sorted(gaps)}"
    assert set(df["status"]) == {"ok"}, df


def test_postgresql_restarted_under_load_loses_nothing(fl: Fleet, pg_server: PgServer, tmp_path: Path) -> None:
    count = 10
    fl.start_swarm(count, "sw", master="a")  # spread over a and b (each agent starts at a random URL)
    wait_for(lambda: fl.online_count("sw") == count, 90, "the swarm online")
    a, b = fl.masters["a"].client, fl.masters["b"].client
    a.schedule("echo", every="1s", targets="sw-*", args={"text": "2"}, name="load")
    wait_for(lambda: len(b.series("load")) >= 2 * count, 60, "samples before the restart")
    ran = tmp_path / "ran.log"
    run = b.run(f"echo $ZY_TASKID >> {ran}; sleep 4; echo done", targets="sw-*", timeout=120)
    wait_for(lambda: ran.exists() and len(ran.read_text().split()) == count, 60, "every task started")
    pg_server.restart()  # fast: every connection of both masters is cut
    df = run.to_dataframe()
    assert len(df) == count and (df["status"] == "ok").all(), df[["hostname", "status", "error"]]
    assert sorted(ran.read_text().split()) == sorted(df["taskid"]), "a task ran twice or not at all"
    after = len(b.series("load"))
    wait_for(lambda: len(a.series("load")) >= after + 5 * count, 90, "samples after the restart")
    for uuid, rows in a.series("load").groupby("uuid"):
        times = sorted(t.timestamp() for t in rows.index)
        gaps = {round(y - x, 3) for x, y in zip(times, times[1:], strict=False)}
        assert gaps == {1}, f"{uuid}: samples lost or doubled across the restart: {sorted(gaps)}"
    # both masters still work together: a run made on a reaches agents held by b, and back
    for client in (a, b):
        again = client.run("echo again", targets="sw-*", timeout=60).to_dataframe()
        assert (again["status"] == "ok").all(), again[["hostname", "status", "error"]]
    wait_for(lambda: sum(holders(fl).values()) == count, 30, "every agent held once")


def test_the_other_master_finishes_a_release_from_the_step_it_was_at(fl: Fleet, tmp_path: Path) -> None:
    names = ["rel-1", "rel-2", "rel-3"]
    with b_away(fl):
        for name in names:
            fl.start_agent(name, {"role": "rel"})
        fl.wait_online(*names, timeout=60)
    wait_for(lambda: holders(fl) == {"a": 3, "b": 0}, 30, "a to report 3 agents, b none")
    fl.wait_singleton("a")  # the first master drives the cluster's releases
    data = os.urandom(2 * 1024 * 1024 + 77)
    (tmp_path / "app.tgz").write_bytes(data)
    b = fl.masters["b"].client
    art = b.artifacts.upload(tmp_path / "app.tgz")["id"]
    srv, steps = tmp_path / "srv", tmp_path / "steps.log"
    srv.mkdir()
    # each step appends a line per agent: a step redone after the takeover shows twice
    rel = b.release(art, names, dest=f"{srv}/{{hostname}}.tgz", batch=1, pre=f"echo pre-$ZY_UUID >> {steps}",
                    health=f"echo health-$ZY_UUID >> {steps}; sleep 4")
    wait_for(lambda: (srv / "rel-1.tgz").exists(), 90, "the first shard placed (its health check runs now)")
    fl.kill_master("a")  # in the middle of shard 1's health step
    fl.wait_singleton("b", timeout=90)
    rel.wait(timeout=180)
    assert rel.state == "done", rel.progress()
    for name in names:
        assert (srv / f"{name}.tgz").read_bytes() == data
    assert list(rel.progress()["status"]) == ["ok", "ok", "ok"]
    lines = steps.read_text().split()
    assert len(lines) == len(set(lines)) == 2 * len(names), f"a step ran twice or not at all: {lines}"


def test_zy_master_cluster_on_one_sqlite_master_and_its_errors(fleet: Fleet, tmp_path: Path) -> None:
    import subprocess

    from fleet import ZY

    data_dir = fleet.root / "master"
    master_id = (data_dir / "master.id").read_text().strip()
    wait_for(lambda: fleet.cluster() and fleet.cluster()[0]["singleton"], 30, "the master to take the lease")
    [row] = fleet.cluster()
    assert row["id"] == master_id and row["alive"] and row["urls"] == [fleet.url]
    table = subprocess.run([*ZY, "master", "cluster", "--data-dir", str(data_dir)], capture_output=True, text=True,
                           env=fleet.env, timeout=60, check=True).stdout
    assert master_id in table and "*" in table and "alive" in table, table
    missing = subprocess.run([*ZY, "master", "cluster", "--data-dir", str(tmp_path / "nothing")],
                             capture_output=True, text=True, env=fleet.env, timeout=60, check=False)
    assert missing.returncode == 2 and "holds no master.db" in missing.stderr, missing.stderr
    refused = subprocess.run([*ZY, "master", "cluster", "--store", "postgresql://nobody@127.0.0.1:1/none"],
                             capture_output=True, text=True, env=fleet.env, timeout=120, check=False)
    assert refused.returncode == 2 and "cannot open the store" in refused.stderr, refused.stderr
