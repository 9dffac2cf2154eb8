"""Two masters' hubs in one process over one real PostgreSQL store, no sockets (issue 15): the
cluster's pieces (master.cluster) with their wake-ups and sweeps, pinned at the level of the
hub's interfaces. The end-to-end behaviour with real processes is tests/test_cluster.py's."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from hcsdk.protocol.messages import DOWN, Cancel, Task, parse
from hcsdk.protocol.tasks import TaskStatus
from master.cluster import master_channel
from master.hub import Hub
from master.sessions import Session
from master.settings import MasterSettings
from master.store import Store, StoreThread, open_store

pytestmark = pytest.mark.anyio

AGENTS = ("a1", "a2", "a3")


def _settings(tmp_path: Path, url: str, master_id: str) -> MasterSettings:
    return MasterSettings(data_dir=tmp_path / master_id, store_url=url, master_id=master_id, cluster_heartbeat=0.2,
                          dispatch_sweep=0.3, master_dead_after=2.0, offline_grace=0.5, startup_grace=0.5)


def _enroll(store: Store) -> None:
    store.add_join_token("tok", "x", 3600, "test")
    for name in AGENTS:
        store.enroll(name, "x", "tok", {"hostname": name}, {}, secrets.token_bytes(32))


@asynccontextmanager
async def _hub(tmp_path: Path, url: str, master_id: str) -> AsyncIterator[Hub]:
    store = open_store(tmp_path, url)
    hub = Hub(StoreThread(store), _settings(tmp_path, url, master_id))
    hub.urls.append(f"https://{master_id}.test:8443")
    try:
        async with anyio.create_task_group() as tg:
            await hub.run(tg)
            yield hub
            hub.begin_shutdown()
            await hub.leave()
            tg.cancel_scope.cancel()
    finally:
        hub.results.close()
        store.close()


@pytest.fixture
async def pair(tmp_path: Path, pg_url: str) -> AsyncIterator[tuple[Hub, Hub]]:
    seed = open_store(tmp_path, pg_url)
    _enroll(seed)
    seed.close()
    async with _hub(tmp_path, pg_url, "m-0000000a") as a, _hub(tmp_path, pg_url, "m-0000000b") as b:
        await _until("a singleton", lambda: a.cluster.is_singleton or b.cluster.is_singleton)
        yield a, b


async def _online(hub: Hub, uuid: str) -> tuple[Session, bytes]:
    key = secrets.token_bytes(32)
    return await hub.handshake(uuid, {"hostname": uuid}, {}, "h2", key), key


async def _until(what: str, predicate: Callable[[], Any], timeout: float = 20) -> Any:
    """Poll ``predicate`` (what is polled is another master's doing: no event to wait on)."""
    try:
        with anyio.fail_after(timeout):
            while not (value := predicate()):  # noqa: ASYNC110
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
    return value


def _sent(session: Session) -> list[Any]:
    out = [parse(d, DOWN) for d in session.outbox]
    session.outbox.clear()
    return out


async def test_a_run_on_one_master_goes_out_from_the_holder_and_a_cancel_too(pair: tuple[Hub, Hub]) -> None:
    a, b = pair
    session, key = await _online(a, "a1")
    assert session.epoch >= 1
    run = await b.create_run("echo", {"text": "hi"}, {"uuids": ["a1", "a2"]}, 30.0)
    # a1 is a's: pending until a sends it; a2 is nobody's: offline as on one master
    assert [t["status"] for t in run["targets"]] == [TaskStatus.PENDING, TaskStatus.OFFLINE]
    await _until("a's session to get the task", lambda: session.outbox)
    [task] = _sent(session)
    assert isinstance(task, Task) and task.verify(key) and task.run == run["run_id"]
    stored = await b.db(b.db.store.task, task.taskid)
    assert stored is not None and stored["status"] == TaskStatus.DISPATCHED
    assert await b.cancel_run(run["run_id"]) == 1  # b holds nothing: the store asks, a sends
    await _until("a to send the cancel", lambda: session.outbox)
    [cancel] = _sent(session)
    assert isinstance(cancel, Cancel) and cancel.taskid == task.taskid and cancel.verify(key)
    await anyio.sleep(1.0)  # a few sweeps: the cancel goes out once
    assert not session.outbox


async def test_a_handshake_on_the_other_master_supersedes_the_first(pair: tuple[Hub, Hub]) -> None:
    a, b = pair
    first, _ = await _online(a, "a1")
    second, _ = await _online(b, "a1")
    assert second.epoch == first.epoch + 1
    await _until("a to close its session", lambda: first.closed.is_set())
    assert "a1" not in a.sessions and b.sessions["a1"] is second
    holders = await a.db(a.db.store.session_holders, ["a1"])
    assert holders == {"a1": (b.cluster.master_id, second.epoch)}
    # a's session ended without dropping b's claim (its epoch is older)
    await anyio.sleep(1.0)
    assert await a.db(a.db.store.session_holders, ["a1"]) == holders
    assert await a.online_uuids(["a1", "a2"]) == {"a1"}  # held by b, so online for a too


async def test_wake_ups_a_master_cannot_parse_change_nothing(pair: tuple[Hub, Hub], pg_url: str) -> None:
    a, b = pair
    session, _ = await _online(a, "a1")
    from master.store.wakeups import PgWakeups

    sender = PgWakeups(pg_url)
    junk = ["s:", "s:a1", "s:a1:", "s:a1:x", "s:a1:-5", "s::9", "d:", "zz", "s:a1:0", "x" * 500,
            f"s:a1:{session.epoch}"]  # (its own epoch: not newer, so not superseded)
    await sender.send(master_channel(a.cluster.master_id), junk)
    await anyio.sleep(1.0)
    assert not session.closed.is_set() and a.sessions["a1"] is session
    # (and a was listening: a newer epoch does close it)
    await sender.send(master_channel(a.cluster.master_id), [f"s:a1:{session.epoch + 1}"])
    await sender.aclose()
    await _until("the session superseded", lambda: session.closed.is_set())


async def test_the_singleton_buries_a_dead_master_and_writes_off_what_nobody_holds(
        pair: tuple[Hub, Hub]) -> None:
    a, b = pair
    holder = a if a.cluster.is_singleton else b
    store = holder.db.store
    # a master that died without a word: its registry entry ages, its session stays claimed
    store.register_master("m-0000dead", ["https://dead.test:8443"], time.time() - 60)
    store.claim_session("a3", "m-0000dead", time.time() - 60)
    run = await holder.create_run("echo", {}, {"uuids": ["a3"]}, 30.0)
    assert [t["status"] for t in run["targets"]] == [TaskStatus.OFFLINE]  # its holder is not live
    pending = await holder.db(store.create_run, "r-dead", "echo", {}, 30.0,
                              [("r-dead.0", "a3", TaskStatus.DISPATCHED, time.time() + 60)])
    assert pending == []

    def gone() -> bool:
        return "m-0000dead" not in {m["id"] for m in store.masters()}

    await _until("the dead master forgotten", gone)
    assert store.session_holders(["a3"]) == {}

    def written_off() -> bool:
        task = store.task("r-dead.0")
        return task is not None and task["status"] == TaskStatus.OFFLINE

    await _until("a3's open task written off", written_off)


async def test_a_restart_lets_go_of_old_sessions_and_a_clean_leave_hands_over_at_once(tmp_path: Path,
                                                                                     pg_url: str) -> None:
    seed = open_store(tmp_path, pg_url)
    _enroll(seed)
    seed.claim_session("a2", "m-000000c1", time.time())  # left by c1's previous run (killed)
    async with _hub(tmp_path, pg_url, "m-000000c1") as c1:
        await _until("c1 singleton", lambda: c1.cluster.is_singleton)
        assert seed.session_holders(["a2"]) == {}  # let go of at the restart: a2 is not online
        seed.close()
        async with _hub(tmp_path, pg_url, "m-000000c2") as c2:
            session, _ = await _online(c1, "a1")
            c1.begin_shutdown()
            await c1.leave()
            assert not c1.cluster.is_singleton
            # well before master_dead_after: the lease was let go, not left to expire
            await _until("c2 takes the lease", lambda: c2.cluster.is_singleton, timeout=1.9)
            assert await c2.db(c2.db.store.session_holders, ["a1"]) == {}
            assert session.closed.is_set()


async def test_the_sweep_repairs_lost_wake_ups(pair: tuple[Hub, Hub]) -> None:
    a, b = pair
    session, key = await _online(a, "a1")
    other, _ = await _online(a, "a2")
    store = b.db.store
    # a task stored pending for a's agent by "another master" that never sent the wake-up
    await b.db(store.create_run, "r-lost", "echo", {"text": "x"}, 30.0,
               [("r-lost.0", "a1", TaskStatus.PENDING, time.time() + 60)])
    await _until("a's sweep to send it", lambda: session.outbox)
    [task] = _sent(session)
    assert isinstance(task, Task) and task.taskid == "r-lost.0" and task.verify(key)
    # a2 claimed by a handshake on b whose "superseded" wake-up was lost
    await b.db(store.claim_session, "a2", b.cluster.master_id, time.time())
    await _until("a's sweep to close the superseded session", lambda: other.closed.is_set())
    assert "a2" not in a.sessions and "a1" in a.sessions


async def test_agents_still_coming_back_keep_the_rest_of_their_cohort_from_being_written_off(
        tmp_path: Path, pg_url: str) -> None:
    """A dead master's agents return one by one (thousands take minutes): while some of those
    nobody held come back, the others' tasks wait; once none returns for a whole grace, the
    ones still gone are written off."""
    seed = open_store(tmp_path, pg_url)
    _enroll(seed)
    seed.close()
    async with _hub(tmp_path, pg_url, "m-0000000a") as a:
        await _until("the singleton", lambda: a.cluster.is_singleton)
        a.settings.offline_grace = 2.0
        store = a.db.store
        rows = [(f"r-back.{i}", uuid, TaskStatus.DISPATCHED, time.time() + 120) for i, uuid in enumerate(AGENTS)]
        await a.db(store.create_run, "r-back", "echo", {}, 60.0, rows)

        def statuses() -> list[str]:
            return [str((store.task(f"r-back.{i}") or {}).get("status")) for i in range(len(AGENTS))]

        await anyio.sleep(1.2)  # a1..a3 gone for most of a grace
        for uuid in AGENTS[:2]:  # two come back, each within a grace of the last
            await _online(a, uuid)
            await anyio.sleep(1.2)
        # a3 has been gone for 3.6 s, well past the grace, but its cohort was still returning
        assert statuses()[2] == TaskStatus.DISPATCHED, statuses()
        await _until("a3's task written off once no one returned for a grace",
                     lambda: statuses()[2] == TaskStatus.OFFLINE)
        assert statuses()[:2] == [TaskStatus.DISPATCHED, TaskStatus.DISPATCHED]  # those that came back keep theirs
