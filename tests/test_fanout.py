"""Fan-out over real processes: master and five agents, real TLS and HTTP/2."""

from __future__ import annotations

import pandas as pd
import pytest

from fleet import Fleet
from hcsdk import COLUMNS, AsyncClient, RequestError, TargetError


def test_fanout_to_five_agents_gives_five_ok_rows(fleet5: Fleet) -> None:
    uuids = list(fleet5.client.inventory()["uuid"])
    before = pd.Timestamp.now(tz="UTC")
    run = fleet5.client.run("echo hi; echo to-stderr >&2; sleep 1", targets=uuids, timeout=30)
    df = run.to_dataframe()
    after = pd.Timestamp.now(tz="UTC")
    assert list(df.columns) == COLUMNS
    assert len(df) == 5
    assert (df["status"] == "ok").all(), df
    assert (df["exit_code"] == 0).all()
    assert (df["stdout"] == "hi\n").all()
    assert (df["stderr"] == "to-stderr\n").all()
    assert set(df["hostname"]) == {"web-1", "web-2", "web-3", "db-1", "db-2"}
    # each agent timed the command it ran: it started after the SDK asked (agents share this
    # host's clock), took the `sleep 1` at least, and ended before the SDK had every row
    assert ((df["started_at"] >= before) & (df["finished_at"] <= after)).all(), (before, df, after)
    assert (df["duration_s"] >= 1.0).all(), df["duration_s"]
    between = (df["finished_at"] - df["started_at"]).dt.total_seconds()
    assert (df["duration_s"] - between).abs().max() < 1e-3, (df["duration_s"], between)


def test_inventory_reports_facts_and_labels(fleet5: Fleet) -> None:
    inv = fleet5.client.inventory()
    assert {"uuid", "hostname", "os", "online", "last_seen", "labels", "kernel", "arch", "cpus", "mem_total",
            "ips", "agent_version"} <= set(inv.columns)
    web1 = inv.set_index("hostname").loc["web-1"]
    assert web1["labels"] == {"role": "web", "idc": "hk"}
    assert web1["online"] and web1["mode"] == "h2"
    assert web1["cpus"] >= 1 and web1["mem_total"] > 0 and web1["arch"]
    import platform

    import hcsdk

    assert web1["kernel"] == platform.release() and web1["os"] and web1["agent_version"] == hcsdk.__version__
    assert isinstance(web1["ips"], list)
    assert web1["last_seen"] >= web1["enrolled_at"]
    web = fleet5.client.inventory("label:role=web")
    assert sorted(web["hostname"]) == ["web-1", "web-2", "web-3"]
    with pytest.raises(TargetError, match="matched no agent"):
        fleet5.client.inventory("label:role=nothing")


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("web-*", {"web-1", "web-2", "web-3"}),
        ("label:role=web,idc=hk", {"web-1", "web-2"}),
        ("label:role=db", {"db-1", "db-2"}),
        ("db-2", {"db-2"}),
    ],
)
def test_target_expressions(fleet5: Fleet, targets: str, expected: set[str]) -> None:
    df = fleet5.client.run("true", targets=targets, timeout=30).to_dataframe()
    assert set(df["hostname"]) == expected
    assert (df["status"] == "ok").all()


def test_targets_as_uuid_list_single_uuid_and_dataframe(fleet5: Fleet) -> None:
    client = fleet5.client
    inv = client.inventory()
    web = inv[inv["hostname"].str.startswith("web-")]
    assert set(client.run("true", targets=web, timeout=30).to_dataframe()["hostname"]) == set(web["hostname"])
    one = fleet5.uuid_of("db-1")
    df = client.run("true", targets=one, timeout=30).to_dataframe()
    assert list(df["uuid"]) == [one]
    df = client.run("true", targets=[one, fleet5.uuid_of("db-2")], timeout=30).to_dataframe()
    assert set(df["hostname"]) == {"db-1", "db-2"}
    df = client.run("true", targets=["web-1", one], timeout=30).to_dataframe()  # hostnames work in lists too
    assert set(df["hostname"]) == {"web-1", "db-1"}


def test_unknown_targets_are_a_clear_error_before_anything_runs(fleet5: Fleet) -> None:
    with pytest.raises(TargetError, match="unknown target 'no-such-host'"):
        fleet5.client.run("true", targets="no-such-host")
    with pytest.raises(TargetError, match="00000000-dead"):
        fleet5.client.run("true", targets=[fleet5.uuid_of("web-1"), "00000000-dead-beef-0000-000000000000"])
    with pytest.raises(TargetError, match="matched no agent"):
        fleet5.client.run("true", targets="cache-*")
    with pytest.raises(TargetError, match="uuid"):
        fleet5.client.run("true", targets=pd.DataFrame({"host": ["x"]}))


def test_events_stream_chunks_with_seq_then_done(fleet5: Fleet) -> None:
    run = fleet5.client.run("for i in 1 2 3; do echo line$i; sleep 0.2; done", targets="web-1", timeout=30)
    events = list(run.events())
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    out = [e for e in events if e.kind == "stdout"]
    assert len(out) >= 2, "output should arrive in several chunks while the command runs"
    assert [e.seq for e in out] == sorted(e.seq for e in out)
    assert "".join(e.data for e in out) == "line1\nline2\nline3\n"
    assert events[-1].status == "ok" and events[-1].exit_code == 0
    assert run.done


def test_exec_runs_argv_without_a_shell(fleet5: Fleet) -> None:
    df = fleet5.client.run(["echo", "$HOME", "a;b"], targets="web-1", timeout=30).to_dataframe()
    assert df.loc[0, "stdout"] == "$HOME a;b\n"


def test_failed_command_is_failed_with_exit_code(fleet5: Fleet) -> None:
    df = fleet5.client.run("echo out; exit 7", targets="web-2", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "failed" and df.loc[0, "exit_code"] == 7 and df.loc[0, "stdout"] == "out\n"


def test_ping_and_facts_plugins(fleet5: Fleet) -> None:
    df = fleet5.client.run(cmd="ping", targets="web-1", timeout=30).to_dataframe()
    assert df.loc[0, "stdout"] == "pong\n" and df.loc[0, "status"] == "ok"
    import json

    df = fleet5.client.run(cmd="facts", targets="db-1", timeout=30).to_dataframe()
    assert json.loads(df.loc[0, "stdout"])["hostname"] == "db-1"


def test_unknown_cmd_word_is_refused(fleet5: Fleet) -> None:
    # any cmd word may name a plugin: the agent that has none by that name says so
    df = fleet5.client.run(cmd="frobnicate", args={}, targets="web-1", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "error" and "unknown cmd 'frobnicate' on this agent" in df.loc[0, "error"]
    with pytest.raises(RequestError, match="is not a cmd word"):
        fleet5.client.run("x", cmd="Frob Nicate", targets="web-1")
    with pytest.raises(RequestError, match="unknown system cmd 'zy.frob'"):
        fleet5.client.run("x", cmd="zy.frob", targets="web-1")


@pytest.mark.anyio
async def test_async_client_in_a_running_loop(fleet5: Fleet) -> None:
    async with AsyncClient(fleet5.url, token=fleet5.admin_token, ca=str(fleet5.root / "master" / "ca.pem")) as client:
        run = await client.run("echo async", targets="web-*", timeout=30)
        seen = [e async for e in run.events() if e.kind == "done"]
        assert len(seen) == 3
        df = await run.to_dataframe()
        assert (df["stdout"] == "async\n").all()
