"""The store's answers to issue 15's review, on SQLite and a real PostgreSQL: a frozen master
cannot stall the others (its locks time out, its transaction is ended), the cluster's times are
the database's clock, a run created while its agent moves stores a task dispatched only where
this master still holds the session, a forgotten master reclaims only what is still its own,
the unheld write-off and the cancel of pending tasks are atomic against claims, and store URLs
never show a password."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hcsdk.protocol.messages import Done
from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.wire import loads
from master.store import SchemaError, Store, open_store
from master.store.copy import describe_url
from master.store.postgres import PostgresStore, pool_size_for, redact
from master.store.sqlite_runs import CANCELLED_UNSENT

ROOT = Path(__file__).resolve().parent.parent
D, P = str(TaskStatus.DISPATCHED), str(TaskStatus.PENDING)


def _status(store: Store, taskid: str) -> str:
    row = store.task(taskid)
    assert row is not None
    return str(row["status"])


def _tasks(run_id: str, targets: dict[str, str]) -> list[tuple[str, str, str, float]]:
    return [(f"{run_id}.{u}", u, st, time.time() + 60) for u, st in targets.items()]


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    out: list[Any] = [None] * n
    go = threading.Barrier(n)

    def one(i: int) -> None:
        go.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# -- 1. a master frozen inside a transaction ------------------------------------------------

def test_pooled_connections_carry_the_session_limits(pg_url: str) -> None:
    s = PostgresStore(pg_url)
    try:
        row = s.one("SELECT current_setting('idle_in_transaction_session_timeout') AS idle, "
                    "current_setting('lock_timeout') AS lock, current_setting('statement_timeout') AS stmt")
        assert row == {"idle": "30s", "lock": "10s", "stmt": "1min"}
        # the pool holds StoreThread's calls, blob calls beside them and a spare
        assert s.pool.max_size == pool_size_for(s.concurrency) == s.concurrency + 3
    finally:
        s.close()
    # a URL's own options come after ours: the setting it names wins, the others stay
    own = PostgresStore(pg_url + "?options=-c%20lock_timeout%3D3s", 1)
    try:
        row = own.one("SELECT current_setting('lock_timeout') AS lock, "
                      "current_setting('idle_in_transaction_session_timeout') AS idle")
        assert row == {"lock": "3s", "idle": "30s"}
    finally:
        own.close()


_FROZEN = """
import os, signal, sys
sys.path.insert(0, {root!r})
from master.store.postgres import PostgresStore
a = PostgresStore({url!r}, 1)
with a.transaction(staging=True) as conn:
    a.lock_runs(conn, ['r1'])
    print('locked', flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_master_frozen_holding_a_runs_lock_stalls_no_other(pg_url: str) -> None:
    b = PostgresStore(pg_url)
    b.add_join_token("tok", "x", 3600, "t")
    b.enroll("ag1", "x", "tok", {"hostname": "h"}, {}, secrets.token_bytes(32))
    b.register_master("m-b", ["https://b"], time.time())
    b.create_run("r1", "echo", {}, 30.0, [("r1.0", "ag1", D, time.time() + 60)])
    child = subprocess.Popen([sys.executable, "-c", _FROZEN.format(root=str(ROOT), url=pg_url)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        errors: list[BaseException] = []

        def ingest() -> None:
            try:
                b.ingest([("ag1", Done(uuid="ag1", taskid="r1.0", seq=0, status=TaskStatus.OK))])
            except BaseException as exc:  # what the master's ingest loop gets (agents then resend)
                errors.append(exc)

        waiting = [threading.Thread(target=ingest) for _ in range(b.concurrency)]
        for t in waiting:
            t.start()
        # every StoreThread slot waits on the frozen master's lock: this master still heartbeats
        assert b.master_heartbeat("m-b", 0, time.time())
        for t in waiting:
            t.join(120)
        assert not any(t.is_alive() for t in waiting), "ingest waited past lock_timeout"
        assert len(errors) == len(waiting)
        assert all(isinstance(e, psycopg.errors.LockNotAvailable) for e in errors), errors
        assert _status(b, "r1.0") == D  # nothing half-written
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    # the lock went with the frozen session: the agent's resend lands
    b.ingest([("ag1", Done(uuid="ag1", taskid="r1.0", seq=0, status=TaskStatus.OK))])
    assert _status(b, "r1.0") == str(TaskStatus.OK)
    b.close()


# -- 2. a run created while its agent moves -------------------------------------------------

def test_create_run_held_dispatches_only_sessions_still_held_at_their_epoch(store: Store) -> None:
    assert store.claim_session("u1", "a", time.time()) == 1
    store.claim_session("u2", "a", time.time())
    assert store.claim_session("u2", "b", time.time()) == 2  # moved to b: a's table says epoch 1
    store.claim_session("u4", "a", time.time())
    store.drop_session("u4", "a", 1)  # a let go of it
    tasks = _tasks("r1", {"u1": D, "u2": D, "u3": D, "u4": D, "u5": P, "u6": str(TaskStatus.OFFLINE)})
    events, sent = store.create_run_held("r1", "echo", {}, 30.0, tasks, ("a", {"u1": 1, "u2": 1, "u3": 1, "u4": 1}))
    assert sent == ["r1.u1"]
    assert [(e["taskid"], e["kind"]) for e in events] == [("r1.u6", "done")]
    assert {u: _status(store, f"r1.{u}") for u in ("u1", "u2", "u3", "u4", "u5", "u6")} == {
        "u1": D, "u2": P, "u3": P, "u4": P, "u5": P, "u6": str(TaskStatus.OFFLINE)}
    # the pending ones are b's to send: its sweep finds u2's
    assert [t["taskid"] for t in store.pending_tasks_held_by("b")] == ["r1.u2"]
    # a wrong epoch of a session this master does hold is not its session either
    _, sent = store.create_run_held("r2", "echo", {}, 30.0, _tasks("r2", {"u1": D}), ("a", {"u1": 7}))
    assert sent == [] and _status(store, "r2.u1") == P
    # the old call, unchanged: as given
    assert store.create_run("r3", "echo", {}, 30.0, _tasks("r3", {"u2": D})) == []
    assert _status(store, "r3.u2") == D


def test_a_claim_racing_create_run_held_always_sees_the_task(pg_url: str) -> None:
    """Master a creates runs for an agent while master b takes its session and redelivers (reads
    its open tasks): every task is either stored pending (b's sweep sends it) or seen by b's
    redelivery. Never dispatched by a and unseen by b."""
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        for n in range(12):
            uuid, run = f"u{n}", f"r{n}"
            epoch = a.claim_session(uuid, "a", time.time())
            seen: list[str] = []

            def step(i: int, uuid: str = uuid, run: str = run, epoch: int = epoch, seen: list[str] = seen
                     ) -> list[str]:
                if i == 0:
                    return a.create_run_held(run, "echo", {}, 30.0, _tasks(run, {uuid: D}), ("a", {uuid: epoch}))[1]
                b.claim_session(uuid, "b", time.time())
                seen += [t["taskid"] for t in b.open_tasks_for(uuid)]
                return []

            sent_by_a, _ = _race(2, step)
            taskid = f"{run}.{uuid}"
            if taskid in sent_by_a:
                assert taskid in seen, "a dispatched a task b's redelivery did not see"
            else:
                assert _status(a, taskid) == P
    finally:
        a.close()
        b.close()


# -- 4. a forgotten master takes back only its own -----------------------------------------

def test_reclaim_session_only_as_this_master_left_it(store: Store) -> None:
    assert store.reclaim_session("nobody", "a", 1) is None  # no such session
    assert store.claim_session("u1", "a", time.time()) == 1
    assert store.reclaim_session("u1", "a", 1) == 2
    assert store.reclaim_session("u1", "a", 1) is None  # a stale epoch
    assert store.drop_sessions_of("a") == ["u1"]  # taken for dead: held by nobody
    assert store.reclaim_session("u1", "a", 2) == 3
    assert store.session_holders(["u1"]) == {"u1": ("a", 3)}
    assert store.claim_session("u1", "b", time.time()) == 4  # the agent moved to b
    assert store.reclaim_session("u1", "a", 3) is None
    assert store.reclaim_session("u1", "a", 4) is None  # b's epoch: still b's
    assert store.session_holders(["u1"]) == {"u1": ("b", 4)}


# -- 5. the write-off of unheld agents' tasks ------------------------------------------------

def test_finish_unheld_skips_agents_someone_holds_when_it_writes(store: Store) -> None:
    store.claim_session("u1", "a", time.time())
    store.claim_session("u2", "a", time.time())
    store.drop_session("u2", "a", 1)
    store.create_run("r1", "echo", {}, 30.0, _tasks("r1", {"u1": P, "u2": P, "u3": P}))
    off = str(TaskStatus.OFFLINE)
    changed = store.finish_unheld([(f"r1.{u}", off, "agent is offline") for u in ("u1", "u2", "u3")])
    assert changed == {"r1"}
    assert {u: _status(store, f"r1.{u}") for u in ("u1", "u2", "u3")} == {"u1": P, "u2": off, "u3": off}
    done = [e["taskid"] for e in store.events_after("r1", 0) if e["kind"] == "done"]
    assert sorted(done) == ["r1.u2", "r1.u3"]
    assert store.finish_unheld([("r1.u1", off, "agent is offline")]) == set()


# -- 6. cancel against the holder's send of a pending task --------------------------------

def test_claim_pending_and_cancel_pending(store: Store) -> None:
    store.create_run("r1", "echo", {}, 30.0, _tasks("r1", {"u1": P, "u2": P, "u3": D, "u4": P}))
    assert store.claim_pending(["r1.u1", "r1.u3", "nope"]) == ["r1.u1"]  # only a pending one
    assert store.claim_pending(["r1.u1"]) == []  # claimed once
    left, changed = store.cancel_pending("r1")
    assert changed == {"r1"}
    assert [(t["taskid"], t["status"]) for t in left] == [("r1.u1", D), ("r1.u3", D)]
    assert _status(store, "r1.u2") == _status(store, "r1.u4") == str(TaskStatus.CANCELLED)
    assert store.claim_pending(["r1.u2", "r1.u4"]) == []  # cancelled: never sent
    done = {e["taskid"]: loads(e["data"]) for e in store.events_after("r1", 0) if e["kind"] == "done"}
    assert done == {t: {"status": str(TaskStatus.CANCELLED), "error": CANCELLED_UNSENT} for t in ("r1.u2", "r1.u4")}
    # a pending task asked to cancel (request_cancel) is not claimed either
    store.create_run("r2", "echo", {}, 30.0, _tasks("r2", {"u1": P}))
    store.request_cancel("r2")
    assert store.claim_pending(["r2.u1"]) == []
    assert store.cancel_pending("r2") == ([], {"r2"})


def test_claims_racing_a_cancel_each_task_is_sent_or_cancelled_never_both(pg_url: str) -> None:
    holders = [PostgresStore(pg_url) for _ in range(2)]
    try:
        for n in range(8):
            run = f"r{n}"
            tasks = _tasks(run, {f"u{i}": P for i in range(6)})
            holders[0].create_run(run, "echo", {}, 30.0, tasks)
            ids = [t[0] for t in tasks]

            def step(i: int, run: str = run, ids: list[str] = ids) -> Any:
                if i == 0:
                    return holders[0].cancel_pending(run)
                return holders[1].claim_pending(ids[i - 1::2])

            (left, _), *claims = _race(3, step)
            claimed = {t for c in claims for t in c}
            to_cancel = {t["taskid"] for t in left}
            for taskid in ids:
                if taskid in claimed:  # sent: its cancel must go out
                    assert taskid in to_cancel and _status(holders[0], taskid) == D
                else:
                    assert _status(holders[0], taskid) == str(TaskStatus.CANCELLED)
    finally:
        for h in holders:
            h.close()


# -- 3. the database's clock ------------------------------------------------------------------

_SKEWED = """
import sys, time
sys.path.insert(0, {root!r})
real = time.time
time.time = lambda: real() + {skew}  # this process's clock is off by {skew} s
from master.store.postgres import PostgresStore
s = PostgresStore({url!r}, 1)
{body}
"""


def _skewed(url: str, skew: float, body: str) -> str:
    out = subprocess.run([sys.executable, "-c", _SKEWED.format(root=str(ROOT), url=url, skew=skew, body=body)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_masters_with_skewed_clocks_agree_on_leases_and_deaths(pg_url: str) -> None:
    b = PostgresStore(pg_url)
    try:
        assert b.take_lease("singleton", "m-b", 10, time.time())
        # a's clock runs 9 s ahead: by its own clock b's lease has expired, by the database's not
        assert _skewed(pg_url, 9, "print(s.take_lease('singleton', 'm-a', 10, time.time()))") == "False"
        assert b.lease_holder("singleton", time.time()) == "m-b"
        # a's clock runs 11 s behind: its fresh heartbeat is fresh, not 11 s old
        _skewed(pg_url, -11, "s.register_master('m-a', ['https://a'], time.time())\n"
                             "s.claim_session('agent-1', 'm-a', time.time())")
        b.register_master("m-b", ["https://b"], time.time())
        assert b.dead_masters(time.time(), 10) == []
        ages = {m["id"]: m["heartbeat_age"] for m in b.masters()}
        assert abs(ages["m-a"]) < 5 and abs(ages["m-b"]) < 5
        # and a master 11 s ahead judges b as alive as b is
        assert _skewed(pg_url, 11, "print(s.dead_masters(time.time(), 10))") == "[]"
    finally:
        b.close()


# -- 7. passwords never in messages -----------------------------------------------------------

@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://zy:s3cret@db:5432/zy", "postgresql://zy:***@db:5432/zy"),
    ("postgresql://zy:p@ss:w/rd@db/zy", "postgresql://zy:***@db/zy"),  # @ : / in the password
    ("postgresql://zy@h1:5432,h2:5432/zy?sslmode=require", "postgresql://zy@h1:5432,h2:5432/zy?sslmode=require"),
    ("postgresql://zy@db/zy?sslmode=require&password=s3cret", "postgresql://zy@db/zy?sslmode=require&password=***"),
    ("postgres://db/zy?PassWord=s3cret&x=1", "postgres://db/zy?PassWord=***&x=1"),
    ("mysql://zy:s3cret@db/zy", "mysql://zy:***@db/zy"),
    ("host=db user=zy password=s3cret dbname=zy", "host=db user=zy password=*** dbname=zy"),
    ("host=db password = 'se cr\\'et' dbname=zy", "host=db password = *** dbname=zy"),
    ("postgresql://:s3cret@db/zy", "postgresql://:***@db/zy"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "s3cret" not in describe_url(url)


def test_no_password_in_store_errors_or_the_banner(tmp_path: Path, pg_url: str) -> None:
    from master.server import _redacted

    with pytest.raises(SchemaError) as wrong:
        open_store(tmp_path, "mysql://zy:s3cret@db/zy")
    assert "s3cret" not in str(wrong.value) and "mysql://zy:***@db/zy" in str(wrong.value)
    bad = pg_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@").rsplit("/", 1)[0] + "/nodb"
    with pytest.raises(RuntimeError) as refused:
        open_store(tmp_path, bad)
    assert "s3cret" not in str(refused.value) and "postgres:***@" in str(refused.value)
    assert _redacted("postgresql://zy:p@ss@db/zy?password=x") == "postgresql://zy:***@db/zy?password=***"
    assert _redacted("") == ""
