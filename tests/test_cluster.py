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
