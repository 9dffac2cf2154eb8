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

from hcsdk.protocol.messages import DOWN, UP, Ack, Cancel, Done, Start, Task, parse
from hcsdk.protocol.tasks import SessionKind, TaskStatus, Verdict, can_move, may_settle
from hcsdk.protocol.wire import FrameError
from master.channel import HubSessions
from master.hub import Hub
from master.sessions import Session, Sessions
from master.settings import MasterSettings
from master.store import SQLiteStore, StoreThread, open_store


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


def test_last_seen_is_written_once_per_interval_and_when_the_session_ends() -> None:
    table = Sessions()
    agent = _session("a1")
    table.open(agent, None, None)
    table.touch(agent)
    first = table.take_seen()
    assert set(first) == {"a1"}  # a new session's first message: at once
    table.touch(agent)
    assert table.take_seen() == {}  # a busy agent's row is not rewritten every second
    table.session_ended(agent)
    last = table.take_seen()
    assert set(last) == {"a1"} and last["a1"] >= first["a1"]  # its last message is kept
    assert table.take_seen() == {}


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
    msg = parse(done.signed(key).to_wire(), UP)  # parsed once, as the uplink does
    assert isinstance(msg, Done) and hub.authentic(msg)
    await hub.ingest("a1", msg)
    with anyio.fail_after(10):
        await changed.wait()
    stored = await hub.db(hub.db.store.task, task.taskid)
    assert stored is not None and stored["status"] == TaskStatus.OK
    with anyio.fail_after(10):  # held for a write to ride with; alone after ACK_DELAY when none comes
        while not session.outbox:
            session.wake = anyio.Event()  # (the task's send set the last one)
            await session.wake.wait()
    [ack] = _sent(session)
    assert isinstance(ack, Ack) and ack.ids == [[task.taskid, 1]] and ack.verify(key)


@pytest.mark.anyio
async def test_acknowledgements_ride_with_the_next_task_as_one_message(hub: Hub, monkeypatch: pytest.MonkeyPatch
                                                                        ) -> None:
    monkeypatch.setattr("master.ingest.ACK_DELAY", 60.0)  # no flush by the clock in this test
    session, key = await _online(hub, "a1")
    runs = [await hub.create_run("echo", {}, {"uuids": ["a1"]}, 30.0) for _ in range(2)]
    tasks = _sent(session)
    for run, task in zip(runs, tasks, strict=True):
        changed = hub.run_changed(run["run_id"])
        done = Done(uuid="a1", cmd="echo", taskid=task.taskid, seq=1, status=TaskStatus.OK, exit_code=0)
        msg = parse(done.signed(key).to_wire(), UP)
        assert isinstance(msg, Done)
        await hub.ingest("a1", msg)
        with anyio.fail_after(10):
            await changed.wait()
    assert not session.outbox  # both acknowledgements are held...
    await hub.create_run("echo", {}, {"uuids": ["a1"]}, 30.0)
    ack, task = _sent(session)  # ...and go first, as one message, with the next task
    assert isinstance(ack, Ack) and ack.verify(key) and isinstance(task, Task)
    assert ack.ids == [[t.taskid, 1] for t in tasks]


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


@pytest.mark.anyio
async def test_an_uplink_message_the_core_cannot_check_costs_only_its_session(hub: Hub) -> None:
    """A payload nested deeper than the MAC's canonical JSON can encode (the frame decoder caps
    nesting first; this is the hub's backstop): never an exception that makes the request a 500.
    Either the core says it does not verify (rejected, counted) or it cannot check it (FrameError,
    which the channel server answers by dropping that session); the other agents' sessions stay."""
    (s1, _), (s2, _) = await _online(hub, "a1"), await _online(hub, "a2")
    run = await hub.create_run("echo", {}, {"uuids": ["a1"]}, 30.0)
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    done = Done(uuid="a1", cmd="echo", taskid=run["targets"][0]["taskid"], seq=1, status=TaskStatus.OK, result=deep)
    table, rejected = HubSessions(hub), hub.stats["rejected"]
    try:
        await table.deliver(s1, [{**done.to_wire(), "m": "0" * 64}])
    except FrameError as exc:
        table.drop(s1, exc)  # what hcsdk.net.channel_server does with it
        assert s1.closed.is_set() and "a1" not in hub.sessions
    else:
        assert hub.stats["rejected"] == rejected + 1
    assert not s2.closed.is_set() and hub.sessions["a2"] is s2


def test_the_stores_moves_are_the_lifecycle_tables(tmp_path: Path) -> None:
    """The store's status lists come from hcsdk.protocol.tasks: a task in each status (and each
    ``final_source``) moves to running on a start, to dispatched on redelivery, and takes an
    agent's done, exactly when can_move / may_settle say it may."""
    store = SQLiteStore(tmp_path / "m.db")
    cases = [(status, source) for status in TaskStatus for source in (None, *Verdict)]
    ids = [f"r1.{i}" for i in range(len(cases))]
    store.create_run("r1", "echo", {}, 30.0, [(t, "a1", TaskStatus.DISPATCHED, 1e12) for t in ids])

    def reset() -> None:
        store.db.execute("DELETE FROM events")
        store.db.executemany("UPDATE tasks SET status=?, final_source=?, exit_code=NULL WHERE taskid=?",
                             [(st, src, t) for (st, src), t in zip(cases, ids, strict=True)])

    def after() -> list[Any]:
        rows = {r["taskid"]: r for r in store.db.execute("SELECT taskid, status, exit_code FROM tasks")}
        return [rows[t] for t in ids]

    reset()
    store.ingest([("a1", Start(uuid="a1", cmd="echo", taskid=t, started_at=1.0)) for t in ids])
    assert [r["status"] != st for r, (st, _) in zip(after(), cases, strict=True)] == \
        [can_move(st, TaskStatus.RUNNING) for st, _ in cases]
    reset()
    store.mark_dispatched(ids)
    assert [r["status"] != st for r, (st, _) in zip(after(), cases, strict=True)] == \
        [can_move(st, TaskStatus.DISPATCHED) for st, _ in cases]
    reset()
    dones = [Done(uuid="a1", cmd="echo", taskid=t, seq=1, status=TaskStatus.FAILED, exit_code=7) for t in ids]
    store.ingest([("a1", d) for d in dones])
    assert [r["exit_code"] == 7 for r in after()] == [may_settle(st, src) for st, src in cases]
    store.close()
