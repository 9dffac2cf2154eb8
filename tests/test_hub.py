"""The master's hub pieces in-process, over a real SQLite store and no sockets: the session table
(carriers, the update hand-over, offline clocks), dispatch (signed tasks and cancels, what a
reconnect redelivers) and the result writer (stored, acknowledged, the run's stream woken).
The end-to-end behaviour is tests/test_lifecycle.py's and test_update.py's; these pin the
pieces' interfaces so the split stays honest."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from hcsdk.protocol.messages import DOWN, Ack, Cancel, Done, Task, parse
from hcsdk.protocol.tasks import SessionKind, TaskStatus
from master.hub import Hub
from master.sessions import Session, Sessions
from master.settings import MasterSettings
from master.store import StoreThread, open_store


def _session(uuid: str, kind: str = SessionKind.AGENT, carrier: Session | None = None) -> Session:
    return Session(uuid=uuid, sid="s", hostname=uuid, mode="h2", kind=kind, carrier=carrier)


def _sent(session: Session) -> list[Any]:
    """What the master queued for ``session``, parsed as the agent parses it."""
    out = [parse(d, DOWN) for d in session.outbox]
    session.outbox.clear()
    return out


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    store = open_store(tmp_path)
    store.add_join_token("tok", "x", 3600, "test")
    for name in ("a1", "a2"):
        store.enroll(name, "x", "tok", {"hostname": name}, {}, secrets.token_bytes(32))
    hub = Hub(StoreThread(store), MasterSettings(data_dir=tmp_path))
    async with anyio.create_task_group() as tg:
        await hub.run(tg)
        yield hub
        hub.begin_shutdown()
        tg.cancel_scope.cancel()
    hub.results.close()


async def _online(hub: Hub, uuid: str, **kw: Any) -> tuple[Session, bytes]:
    key = secrets.token_bytes(32)
    session = await hub.handshake(uuid, {"hostname": uuid}, {}, "h2", key, **kw)
    return session, key


def test_a_proxy_that_goes_takes_the_agents_it_carries() -> None:
    table = Sessions()
    proxy = _session("p1", SessionKind.PROXY)
    table.open(proxy, None, None)
    agent = _session("a1", carrier=proxy)
    table.open(agent, None, None)
    assert proxy.children == {"a1"} and table.carried(proxy, "a1") is agent and table.carried(agent, "p1") is None
    table.session_ended(proxy)
    assert table.sessions == {} and agent.closed.is_set()
    assert set(table.offline_since) == {"p1", "a1"}
    table.close_all("stopping")
    table.open(_session("a2"), None, None)
    table.session_ended(table.sessions["a2"])
    assert "a2" not in table.offline_since  # a master going away starts no offline clock


def test_an_offline_clock_reset_meanwhile_is_left_alone() -> None:
    table = Sessions()
    table.presume_offline(["a1"], 10.0)
    table.presume_offline(["a1"], 20.0)  # the first presumption stands
    assert table.offline_clocks() == [("a1", 10.0)]
    assert not table.stop_clock("a1", 5.0) and table.stop_clock("a1", 10.0) and table.offline_clocks() == []


@pytest.mark.anyio
async def test_tasks_and_cancels_go_out_signed_and_come_again_on_reconnect(hub: Hub) -> None:
    session, key = await _online(hub, "a1")
    run = await hub.create_run("echo", {"text": "hi"}, {"uuids": ["a1", "a2"]}, 30.0)
    assert [t["status"] for t in run["targets"]] == [TaskStatus.DISPATCHED, TaskStatus.OFFLINE]
    [task] = _sent(session)
    assert isinstance(task, Task) and task.verify(key) and task.aud == "a1" and task.args == {"text": "hi"}
    # the channel dropped before the agent saw it: the next handshake sends it again
    hub.session_ended(session)
    again, key = await _online(hub, "a1")
    [resent] = _sent(again)
    assert isinstance(resent, Task) and resent.taskid == task.taskid and resent.verify(key)
    assert await hub.cancel_run(run["run_id"]) == 1
    [cancel] = _sent(again)
    assert isinstance(cancel, Cancel) and cancel.taskid == task.taskid and cancel.verify(key)


@pytest.mark.anyio
async def test_results_are_stored_acknowledged_and_wake_the_run(hub: Hub) -> None:
    session, key = await _online(hub, "a1")
    run = await hub.create_run("echo", {}, {"uuids": ["a1"]}, 30.0)
    [task] = _sent(session)
    changed = hub.run_changed(run["run_id"])
    done = Done(uuid="a1", cmd="echo", taskid=task.taskid, seq=1, status=TaskStatus.OK, exit_code=0)
    wire = done.signed(key).to_wire()
    assert hub.authentic(wire)
    await hub.ingest("a1", wire)
    with anyio.fail_after(10):
        await changed.wait()
    [ack] = _sent(session)  # acknowledged before the run's waiters are woken
    assert isinstance(ack, Ack) and ack.ids == [[task.taskid, 1]] and ack.verify(key)
    stored = await hub.db(hub.db.store.task, task.taskid)
    assert stored is not None and stored["status"] == TaskStatus.OK


@pytest.mark.anyio
async def test_an_update_hands_over_and_falls_back_if_the_new_build_dies(hub: Hub) -> None:
    old, _ = await _online(hub, "a1")
    run = await hub.create_run("zy.update", {"sha256": "0" * 64}, {"uuids": ["a1"]}, 60.0)
    taskid = run["targets"][0]["taskid"]
    new, _ = await _online(hub, "a1", handover=taskid)
    assert hub.sessions["a1"] is new and hub.retiring["a1"] is old and not old.closed.is_set()
    assert hub.carried(old, "a1") is old  # the old build still reports what it runs
    hub.session_ended(new)
    assert hub.sessions["a1"] is old and "a1" not in hub.retiring
    # a handover naming no open update of this agent is an ordinary reconnect
    newer, _ = await _online(hub, "a1", handover="r0.0")
    assert old.closed.is_set() and hub.sessions["a1"] is newer and hub.retiring == {}
