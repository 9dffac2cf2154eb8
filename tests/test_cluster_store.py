"""The cluster's state in the store (issue 15, part B1), on SQLite and on a real PostgreSQL:
leases expire and move, epochs supersede, a dead master's sessions are dropped, the pending
tasks a master holds; and wake-ups: in-process, and LISTEN/NOTIFY between two instances,
split to fit, surviving a LISTEN backend that is killed or frozen."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from hcsdk.protocol.tasks import TaskStatus
from master.store import Store, open_store
from master.store.migrate import MIGRATIONS
from master.store.wakeups import (
    MAX_PAYLOAD,
    RUNS,
    LocalWakeups,
    PgWakeups,
    channel_name,
    master_channel,
    open_wakeups,
    payloads,
)

T0 = 1_000_000.0  # the callers' clock in these tests: any number will do


# -- leases ---------------------------------------------------------------------------------

def test_a_lease_is_renewed_by_its_holder_refused_to_others_and_taken_once_expired(store: Store) -> None:
    assert store.lease_holder("singleton", T0) is None
    assert store.take_lease("singleton", "a", 10, T0)
    assert store.take_lease("singleton", "a", 10, T0 + 5)  # renewed: now good until T0 + 15
    assert not store.take_lease("singleton", "b", 10, T0 + 14)
    assert store.lease_holder("singleton", T0 + 14) == "a"
    # (half a second past the boundary: on PostgreSQL ``now`` is an offset from the caller's
    # clock onto the database's, so each call's ``now`` is off by the time between the calls)
    assert store.lease_holder("singleton", T0 + 15.5) is None  # expired
    assert store.take_lease("singleton", "b", 10, T0 + 15.5)
    assert not store.take_lease("singleton", "a", 10, T0 + 16)
    assert store.lease_holder("singleton", T0 + 16) == "b"
    # another lease is another row
    assert store.take_lease("other", "a", 10, T0 + 16)


def test_a_released_lease_is_free_at_once_and_only_its_holder_releases_it(store: Store) -> None:
    assert store.take_lease("singleton", "a", 10, T0)
    store.release_lease("singleton", "b")
    assert store.lease_holder("singleton", T0 + 1) == "a"
    store.release_lease("singleton", "a")
    assert store.lease_holder("singleton", T0 + 1) is None
    assert store.take_lease("singleton", "b", 10, T0 + 1)


# -- sessions -------------------------------------------------------------------------------

def test_a_second_claim_supersedes_the_first_and_an_old_epoch_drops_nothing(store: Store) -> None:
    assert store.claim_session("u1", "a", T0) == 1
    assert store.claim_session("u1", "b", T0 + 1) == 2
    assert store.session_holders(["u1"]) == {"u1": ("b", 2)}
    assert not store.drop_session("u1", "a", 1)  # a's session was superseded
    assert not store.drop_session("u1", "b", 1)  # not b's epoch
    assert store.session_holders() == {"u1": ("b", 2)}
    assert store.drop_session("u1", "b", 2)
    assert store.session_holders() == {}
    # epochs only grow, even across a drop: a stale holder of epoch 1 or 2 can never match again
    assert store.claim_session("u1", "a", T0 + 2) == 3


def test_session_holders_of_many_uuids(store: Store) -> None:
    uuids = [f"u{i}" for i in range(1200)]  # more than one SQLite parameter list
    for u in uuids[::2]:
        store.claim_session(u, "a", T0)
    held = store.session_holders(uuids + ["nobody"])
    assert held == {u: ("a", 1) for u in uuids[::2]}
    assert store.session_holders([]) == {}


def test_a_dead_masters_sessions_are_dropped_and_it_is_forgotten(store: Store) -> None:
    store.register_master("a", ["https://a:1"], T0)
    store.register_master("b", ["https://b:1"], T0)
    for u in ("u1", "u2"):
        store.claim_session(u, "b", T0)
    store.claim_session("u3", "a", T0)
    assert store.take_lease("singleton", "b", 10, T0)
    assert store.master_heartbeat("a", 1, T0 + 9)
    assert store.dead_masters(T0 + 9, 10) == []
    assert store.dead_masters(T0 + 11, 10) == ["b"]

    assert store.drop_sessions_of("b") == ["u1", "u2"]
    assert store.session_holders() == {"u3": ("a", 1)}
    store.forget_master("b")
    assert [m["id"] for m in store.masters()] == ["a"]
    assert store.lease_holder("singleton", T0 + 1) is None  # its lease went with it
    assert store.drop_sessions_of("b") == []
    # a forgotten master's heartbeat says so (it registers again)
    assert not store.master_heartbeat("b", 2, T0 + 12)
    # its agents, back on a, supersede whatever b still thinks it holds
    assert store.claim_session("u1", "a", T0 + 12) == 2


def test_the_masters_registry_and_the_singleton_flag(store: Store) -> None:
    now = time.time()  # masters() judges the lease by the clock
    store.register_master("a", ["https://a:1", "https://10.0.0.1:1"], now)
    store.register_master("b", ["https://b:1"], now + 1)
    assert store.master_heartbeat("a", 7, now + 2)
    assert store.take_lease("singleton", "b", 60, now)
    got = {m["id"]: m for m in store.masters()}
    # (approximate: PostgreSQL keeps its own clock, offset by the caller's ``now``)
    assert got["a"] == {"id": "a", "urls": ["https://a:1", "https://10.0.0.1:1"],
                        "started_at": pytest.approx(now, abs=1), "heartbeat_at": pytest.approx(now + 2, abs=1),
                        "heartbeat_age": pytest.approx(-2, abs=1), "agents": 7, "singleton": False}
    assert got["b"]["singleton"] and got["b"]["agents"] == 0
    # an expired lease makes no singleton
    store.release_lease("singleton", "b")
    assert store.take_lease("singleton", "a", 1, now - 100)
    assert not any(m["singleton"] for m in store.masters())
    # a restart of the same id starts over
    store.register_master("a", ["https://a:2"], now + 5)
    a = next(m for m in store.masters() if m["id"] == "a")
    assert (a["urls"], a["agents"]) == (["https://a:2"], 0)
    assert a["started_at"] == pytest.approx(now + 5, abs=1) and a["heartbeat_at"] == pytest.approx(now + 5, abs=1)


# -- tasks of the sessions a master holds ---------------------------------------------------

def _run(store: Store, run_id: str, targets: dict[str, TaskStatus]) -> dict[str, str]:
    """A run with one task per target in the given status; uuid -> taskid."""
    tasks: list[tuple[str, str, str, float]] = [(f"{run_id}-{u}", u, status, T0 + 60) for u, status in targets.items()]
    store.create_run(run_id, "echo", {"text": "hi", "n": [1, 2]}, 30.0, tasks)
    return {u: tid for tid, u, _, _ in tasks}


def test_pending_tasks_held_by_a_master(store: Store) -> None:
    P, D = TaskStatus.PENDING, TaskStatus.DISPATCHED
    ids = _run(store, "r1", {"u1": P, "u2": P, "u3": D, "u4": TaskStatus.OFFLINE, "u5": P})
    store.claim_session("u1", "a", T0)
    store.claim_session("u2", "b", T0)
    store.claim_session("u3", "a", T0)
    store.claim_session("u4", "a", T0)
    # u5: held by nobody
    mine = store.pending_tasks_held_by("a")
    assert [t["taskid"] for t in mine] == [ids["u1"]]
    # the columns of open_tasks_for, and the agent
    same = next(t for t in store.open_tasks_for("u1") if t["taskid"] == ids["u1"])
    assert mine[0] == {**same, "uuid": "u1"}
    assert mine[0]["status"] == P
    assert [t["taskid"] for t in store.pending_tasks_held_by("b")] == [ids["u2"]]
    assert store.pending_tasks_held_by("nobody") == []

    store.mark_dispatched([ids["u1"]])
    assert store.pending_tasks_held_by("a") == []
    # a session that moved takes its pending tasks along
    store.claim_session("u2", "a", T0 + 1)
    assert [t["taskid"] for t in store.pending_tasks_held_by("a")] == [ids["u2"]]
    assert store.pending_tasks_held_by("b") == []
    store.drop_sessions_of("a")
    assert store.pending_tasks_held_by("a") == []


def test_cancels_held_by_a_master(store: Store) -> None:
    P, D = TaskStatus.PENDING, TaskStatus.DISPATCHED
    ids = _run(store, "r2", {"u1": D, "u2": D, "u3": P})
    _run(store, "r3", {"u1": D})  # not cancelled
    for u in ("u1", "u3"):
        store.claim_session(u, "a", T0)
    store.claim_session("u2", "b", T0)
    assert store.cancels_held_by("a") == []
    store.request_cancel("r2")
    got = store.cancels_held_by("a")
    # a pending task is not out yet: there is nothing to cancel on its agent
    assert [(t["taskid"], t["run_id"], t["uuid"], t["status"]) for t in got] == [(ids["u1"], "r2", "u1", D)]
    assert [t["taskid"] for t in store.cancels_held_by("b")] == [ids["u2"]]
    store.finish_by_master([(ids["u1"], TaskStatus.CANCELLED, "cancelled")])
    assert store.cancels_held_by("a") == []


def test_the_pending_index_names_the_protocols_status() -> None:
    """The migrations spell the status out (a schema is frozen text); it must stay the protocol's."""
    for folder in (MIGRATIONS, MIGRATIONS.with_name("migrations_pg")):
        assert f"WHERE status = '{TaskStatus.PENDING}'" in (folder / "0002_cluster.sql").read_text()


# -- PostgreSQL: several masters at once ----------------------------------------------------

def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """``fn(0..n-1)`` in n threads released together."""
    gate = threading.Barrier(n)
    out: list[Any] = [None] * n

    def one(i: int) -> None:
        gate.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_masters_racing_for_a_lease_and_a_session_on_postgres(pg_url: str, tmp_path: Path) -> None:
    stores = [open_store(tmp_path, pg_url) for _ in range(2)]  # two masters, four connections each
    try:
        won = _race(8, lambda i: stores[i % 2].take_lease("singleton", f"m{i}", 10, T0))
        assert sum(won) == 1
        assert stores[0].lease_holder("singleton", T0) == f"m{won.index(True)}"
        epochs = _race(8, lambda i: stores[i % 2].claim_session("u1", f"m{i}", T0))
        assert sorted(epochs) == list(range(1, 9))
        last = epochs.index(8)
        assert stores[1].session_holders(["u1"]) == {"u1": (f"m{last}", 8)}
    finally:
        for s in stores:
            s.close()


def test_a_postgres_store_at_version_1_gains_the_cluster_tables(pg_url: str, tmp_path: Path) -> None:
    from master.store.postgres_migrate import MIGRATIONS_PG, migrate_pg

    old = tmp_path / "v1"
    old.mkdir()
    (old / "0001_initial.sql").write_text((MIGRATIONS_PG / "0001_initial.sql").read_text())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert migrate_pg(conn, old) == [1]
    s = open_store(tmp_path, pg_url)
    try:
        assert 2 in s.migrated  # type: ignore[attr-defined]
        assert s.claim_session("u1", "a", T0) == 1
    finally:
        s.close()


# -- wake-ups -------------------------------------------------------------------------------

def test_channel_names_are_postgres_identifiers() -> None:
    assert channel_name(RUNS) == RUNS
    assert master_channel("m-1A2b") == "zy_m_m_1a2b"
    odd = [channel_name(x) for x in ("zy_m_a.b", "zy_m_a/b", "ä", "x" * 100, "X" * 100, "Zy_runs")]
    assert all(len(c) <= 63 and c.replace("_", "").isalnum() and c.isascii() and c == c.lower() for c in odd)
    assert len(set(odd)) == len(odd)  # names that had to change do not merge


def test_payloads_fit_postgres_and_keep_every_id_in_order() -> None:
    ids = [f"d:{secrets.token_hex(16)}" for _ in range(1000)] + ["é" * 300]
    parts = payloads(ids)
    assert len(parts) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD for p in parts)
    assert [i for p in parts for i in p.split(",")] == ids
    assert payloads([]) == []
    for bad in ("", "a,b", "x" * (MAX_PAYLOAD + 1), 7):
        with pytest.raises(ValueError, match="wake-up id"):
            payloads(["ok", bad])  # type: ignore[list-item]


@pytest.mark.anyio
async def test_local_wakeups_reach_this_processes_subscribers() -> None:
    w = open_wakeups(None)
    assert isinstance(w, LocalWakeups)
    got: list[list[str]] = []
    other: list[list[str]] = []

    def boom(ids: list[str]) -> None:
        raise RuntimeError("a subscriber's own bug")

    w.subscribe(master_channel("m-1"), boom)
    w.subscribe(master_channel("m-1"), got.append)
    w.subscribe(RUNS, other.append)
    await w.send("zy_m_m_1", ["d:r1", "d:r2"])
    await w.send(master_channel("m-2"), ["d:r3"])  # nobody listens there
    await w.send(RUNS, [])
    assert got == [["d:r1", "d:r2"]] and other == []
    with pytest.raises(ValueError):
        await w.send(RUNS, ["a,b"])


async def _until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    try:
        with anyio.fail_after(timeout):
            while not check():  # noqa: ASYNC110 - callbacks fill what this polls
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"not {what} within {timeout} s")


def _backend_pid(url: str, application_name: str) -> int | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
    return int(row[0]) if row else None


class _Inbox:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, ids: list[str]) -> None:
        self.calls.append(ids)

    @property
    def ids(self) -> list[str]:
        return [i for c in self.calls for i in c]


def _pg(url: str, **kw: Any) -> PgWakeups:
    return PgWakeups(url, application_name=f"zyt-{secrets.token_hex(3)}", **kw)


@pytest.mark.anyio
async def test_pg_wakeups_between_two_instances(pg_url: str) -> None:
    a, b = _pg(pg_url), _pg(pg_url)
    assert isinstance(open_wakeups(pg_url), PgWakeups)
    to_b, runs_a, runs_b = _Inbox(), _Inbox(), _Inbox()
    b.subscribe(master_channel("m-b"), to_b)
    b.subscribe(RUNS, runs_b)
    a.subscribe(RUNS, runs_a)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        tg.start_soon(b.run)
        with anyio.fail_after(30):
            await a.wait_listening()
            await b.wait_listening()
        await a.send(master_channel("m-b"), ["d:r1", "s:u1:3"])
        await _until(lambda: to_b.ids == ["d:r1", "s:u1:3"], "b woken")
        await b.send(RUNS, ["r1"])  # every listener, the sender's own too
        await _until(lambda: runs_a.ids == ["r1"] and runs_b.ids == ["r1"], "both woken")

        many = [f"d:{secrets.token_hex(18)}" for _ in range(3000)]  # ~120 KB of ids
        await a.send(master_channel("m-b"), many)
        await _until(lambda: len(to_b.ids) == 2 + len(many), "every id")
        assert to_b.ids[2:] == many
        assert len(to_b.calls) > 1 + len(many) * 40 // MAX_PAYLOAD - 1
        assert all(len(",".join(c).encode()) <= MAX_PAYLOAD for c in to_b.calls)

        # what another writer sends, however odd, arrives as ids (empty parts dropped)
        with psycopg.connect(pg_url, autocommit=True) as raw:
            raw.execute("SELECT pg_notify(%s, %s)", (master_channel("m-b"), ",,x,,y,"))
            raw.execute("SELECT pg_notify(%s, '')", (master_channel("m-b"),))
        await _until(lambda: to_b.ids[-2:] == ["x", "y"], "raw notify")

        # a channel subscribed while the loop runs is listened to next
        late = _Inbox()
        b.subscribe("zy_late", late)
        with anyio.fail_after(30):
            await b.wait_listening()
        await a.send("zy_late", ["d:late"])
        await _until(lambda: late.ids == ["d:late"], "woken on a channel subscribed late")
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_killed_listen_backend_is_replaced(pg_url: str) -> None:
    reconnected = anyio.Event()
    b = _pg(pg_url, on_reconnect=reconnected.set)
    a = _pg(pg_url)
    inbox = _Inbox()
    b.subscribe("zy_m_b", inbox)
    async with anyio.create_task_group() as tg:
        tg.start_soon(b.run)
        with anyio.fail_after(30):
            await b.wait_listening()
        old = _backend_pid(pg_url, f"{b.application_name}-listen")
        assert old is not None
        with psycopg.connect(pg_url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (old,)).fetchone() == (True,)
        with anyio.fail_after(30):
            await reconnected.wait()
            await b.wait_listening()
        new = _backend_pid(pg_url, f"{b.application_name}-listen")
        assert new is not None and new != old and b.connects == 2
        await a.send("zy_m_b", ["d:after"])
        await _until(lambda: inbox.ids == ["d:after"], "woken after the reconnect")

        # the sender's own connection killed: the next send goes out on a new one
        sender = _backend_pid(pg_url, f"{a.application_name}-send")
        assert sender is not None
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (sender,))
        await a.send("zy_m_b", ["d:again"])
        await _until(lambda: inbox.ids == ["d:after", "d:again"], "sent on a new connection")
        await a.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_listen_backend_that_stops_answering_is_replaced(pg_url: str) -> None:
    """A frozen backend (SIGSTOP) keeps its TCP connection open and says nothing, as a peer
    behind a dead network does: only the probe notices."""
    reconnected = anyio.Event()
    b = _pg(pg_url, on_reconnect=reconnected.set, probe_every=0.3, probe_timeout=1.0)
    inbox = _Inbox()
    b.subscribe("zy_m_b", inbox)
    frozen: int | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.run)
            with anyio.fail_after(30):
                await b.wait_listening()
            frozen = _backend_pid(pg_url, f"{b.application_name}-listen")
            assert frozen is not None
            os.kill(frozen, signal.SIGSTOP)
            with anyio.fail_after(30):
                await reconnected.wait()
                await b.wait_listening()
            a = _pg(pg_url)
            await a.send("zy_m_b", ["d:thawed"])
            await _until(lambda: inbox.ids == ["d:thawed"], "woken on the new connection")
            await a.aclose()
            tg.cancel_scope.cancel()
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)


@pytest.mark.anyio
async def test_a_wakeup_to_a_store_that_is_away_is_lost_quietly(caplog: pytest.LogCaptureFixture) -> None:
    # nothing listens on port 1: the wake-up is lost, the caller is not failed (receivers sweep)
    w = PgWakeups("postgresql://postgres@127.0.0.1:1/none", probe_timeout=1.0)
    await w.send(RUNS, ["r1", "r2"])
    assert "wake-up on zy_runs lost (2 ids)" in caplog.text
