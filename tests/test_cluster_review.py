"""The last review findings of issue 15, as tests on a real PostgreSQL store (and SQLite where the
store's methods exist on both).

1. Two processes with one master id (a copied data dir, a restored backup of DATA_DIR): the second
   refuses to start while the first heartbeats; a run that crashed without leaving is taken over
   after a few beats; a stale twin (its id taken while it seemed dead) stops, leaving the live
   one's records alone.
2. A release step's run is created once even when its driver dies between storing the step and
   creating the run (or just after).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from master.cluster import SINGLETON
from master.hub import Hub
from master.settings import MasterSettings
from master.store import Store, StoreThread, open_store

AGENTS = ("a1", "a2")
ID = "m-0000000a"


# -- the store's methods ---------------------------------------------------------------------------

def test_a_master_id_is_joined_only_by_its_process_while_that_one_heartbeats(store: Store) -> None:
    now = time.time()
    assert store.join_master(ID, "first", ["https://a:1"], now, 10)
    assert store.join_master(ID, "first", ["https://a:2"], now, 10)  # its own process again: fine
    assert not store.join_master(ID, "copy", ["https://b:1"], now, 10)
    instance, beat, age = store.master_instance(ID) or ("", 0.0, 0.0)
    assert instance == "first" and age < 5
    assert not store.join_master(ID, "copy", [], now, 10, stale_beat=beat - 1)  # it beat since
    assert store.join_master(ID, "copy", [], now, 10, stale_beat=beat)  # its beat never moved: taken
    assert (store.master_instance(ID) or ("",))[0] == "copy"
    assert store.master_instance("m-00000000") is None


def test_a_silent_process_of_an_id_is_taken_over(store: Store) -> None:
    store.register_master(ID, [], time.time() - 60, "crashed")
    assert store.join_master(ID, "next", [], time.time(), 10)


def test_a_stale_twin_heartbeats_and_renews_nothing(store: Store) -> None:
    now = time.time()
    assert store.join_master(ID, "twin", [], now, 10)
    assert store.take_lease(SINGLETON, ID, 10, now, "twin")
    assert not store.master_heartbeat(ID, 3, now, "stale")
    assert not store.take_lease(SINGLETON, ID, 10, now, "stale")  # the lease is the id's, not the process's
    assert not store.take_lease("other", ID, 10, now, "stale")  # nor takes a free one
    assert store.master_heartbeat(ID, 3, now, "twin")
    assert store.take_lease(SINGLETON, ID, 10, now, "twin")
    assert store.master_heartbeat(ID, 3, now)  # (without a token: as before)


# -- two hubs over one PostgreSQL store ------------------------------------------------------------

def _settings(tmp_path: Path, url: str, name: str) -> MasterSettings:
    return MasterSettings(data_dir=tmp_path / name, store_url=url, master_id=ID, cluster_heartbeat=0.2,
                          dispatch_sweep=0.3, master_dead_after=2.0, offline_grace=0.5, startup_grace=0.5)


def _enroll(store: Store) -> None:
    store.add_join_token("tok", "x", 3600, "test")
    for name in AGENTS:
        store.enroll(name, "x", "tok", {"hostname": name}, {}, secrets.token_bytes(32))


async def _until(what: str, predicate: Callable[[], Any], timeout: float = 20) -> Any:
    try:
        with anyio.fail_after(timeout):
            while not (value := predicate()):  # noqa: ASYNC110 - another process's doing
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
    return value


@asynccontextmanager
async def _hub(tmp_path: Path, url: str, name: str) -> AsyncIterator[Hub]:
    store = open_store(tmp_path, url)
    hub = Hub(StoreThread(store), _settings(tmp_path, url, name))
    hub.urls.append(f"https://{name}.test:8443")
    stops: list[str] = []
    hub.cluster.on_twin = stops.append  # (the real one sends this process a SIGTERM)
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
def seeded(tmp_path: Path, pg_url: str) -> Iterator[Store]:
    s = open_store(tmp_path, pg_url)
    _enroll(s)
    try:
        yield s
    finally:
        s.close()


def test_a_copied_data_dir_refuses_to_start_beside_the_live_master(tmp_path: Path, pg_url: str) -> None:
    """Two real master processes: the second on a copy of the first's data dir (same master.id)."""
    import shutil
    import subprocess

    from fleet import ZY, Fleet, wait_for

    fleet = Fleet(tmp_path, ["--heartbeat", "2"], store=pg_url)
    try:
        fleet.start_master(name="a")
        live = fleet.masters["a"]
        wait_for(lambda: any(r["id"] == live.master_id for r in fleet.cluster()), 30, "a in the registry")
        copy = tmp_path / "copy"
        shutil.copytree(live.data_dir, copy, ignore=shutil.ignore_patterns("listen.port", "*.lock"))
        argv = [*ZY, "master", "--data-dir", str(copy), "--listen", "127.0.0.1:0", "--no-user-config",
                "--store", pg_url, "--key-file", str(fleet.key_file)]
        refused = subprocess.run(argv, capture_output=True, text=True, env=fleet.env, timeout=120, check=False)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert (f"another master with id {live.master_id} is alive (heartbeat" in refused.stderr
                and "remove DATA_DIR/master.id on the copy" in refused.stderr), refused.stderr
        assert "Traceback" not in refused.stderr
        # the live master was left alone: still in the registry, alive
        assert [r["alive"] for r in fleet.cluster() if r["id"] == live.master_id] == [True]
        assert live.proc.alive
    finally:
        fleet.close()


@pytest.mark.anyio
async def test_a_run_that_crashed_without_leaving_is_taken_over_after_a_few_beats(tmp_path: Path, pg_url: str,
                                                                                  seeded: Store) -> None:
    seeded.register_master(ID, ["https://old.test:8443"], time.time(), "crashed")  # fresh, but never again
    seeded.claim_session("a1", ID, time.time())
    async with _hub(tmp_path, pg_url, "restarted") as hub:
        assert (seeded.master_instance(ID) or ("",))[0] == hub.cluster.instance
        assert seeded.session_holders(["a1"]) == {}  # the crashed run's session let go of
        await _until("the singleton", lambda: hub.cluster.is_singleton)


@pytest.mark.anyio
async def test_a_stale_twin_stops_and_leaves_the_live_ones_records(tmp_path: Path, pg_url: str,
                                                                   seeded: Store) -> None:
    async with _hub(tmp_path, pg_url, "stale") as stale, anyio.create_task_group() as tg:
        await _until("the singleton", lambda: stale.cluster.is_singleton)
        # a copy started while this one seemed dead (frozen) took the id; it heartbeats from now
        seeded.register_master(ID, ["https://copy.test:8443"], time.time(), "copy")

        async def beat() -> None:
            while True:
                seeded.master_heartbeat(ID, 0, time.time(), "copy")
                seeded.take_lease(SINGLETON, ID, 2.0, time.time(), "copy")
                await anyio.sleep(0.1)

        tg.start_soon(beat)
        message = await _until("the stale twin stopping", lambda: stale.cluster.twin)
        assert f"another master with id {ID} is alive" in message
        assert not stale.cluster.is_singleton
        await stale.leave()  # (what its shutdown does): nothing of the live one's is touched
        assert (seeded.master_instance(ID) or ("",))[0] == "copy"
        assert seeded.lease_holder(SINGLETON, time.time()) == ID
        tg.cancel_scope.cancel()


# -- 2. a release step's run is created once ------------------------------------------------------

REL = "relreview"


def _runs(store: Store) -> int:
    db = getattr(store, "db", None)
    if db is not None:  # SQLite
        return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
    row = store.one("SELECT COUNT(*) AS n FROM runs")  # type: ignore[attr-defined]
    return int(row["n"])


@asynccontextmanager
async def _releases(store: Store, tmp_path: Path) -> AsyncIterator[Any]:
    from master.releases import Releases

    settings = MasterSettings(data_dir=tmp_path / "rel", startup_grace=0.2, offline_grace=0.2)
    hub = Hub(StoreThread(store), settings)
    releases = Releases(hub)
    _enroll(store)
    now = time.time()
    store.add_release({"id": REL, "artifact_id": "sha-1", "name": "app", "manifest": {"sha256": "x"},
                       "dest": "/opt/app", "options": {"pre": "echo pre", "timeout": 5, "limit": 5,
                                                       "max_failures": 5},
                       "shards": [list(AGENTS)], "state": "running", "created_at": now, "updated_at": now},
                      [(a, a, 0) for a in AGENTS])
    try:
        yield releases
    finally:
        hub.results.close()


async def _step(releases: Any, store: Store) -> None:
    from hcsdk.protocol.releases import Phase

    rel = store.release(REL)
    assert rel is not None
    with anyio.fail_after(30):  # (the targets are offline: the run ends at once)
        await releases._do_step(rel, list(AGENTS), Phase.PRE)


@pytest.mark.anyio
async def test_a_step_whose_driver_died_before_its_run_existed_creates_it_once_under_its_id(
        store: Store, tmp_path: Path) -> None:
    async with _releases(store, tmp_path) as releases:
        store.update_release(REL, {"step": "pre", "step_run": "rchosen00001"}, ())  # stored, then the crash
        await _step(releases, store)
        assert store.run_exists("rchosen00001") and _runs(store) == 1
        await _step(releases, store)  # and the next driver again: follows it
        assert _runs(store) == 1


@pytest.mark.anyio
async def test_a_step_whose_run_exists_is_followed_not_created_again(store: Store, tmp_path: Path) -> None:
    async with _releases(store, tmp_path) as releases:
        await releases.hub.create_run("shell", {"script": "echo pre"}, {"uuids": list(AGENTS)}, 5.0,
                                      run_id="rmade0000001")
        store.update_release(REL, {"step": "pre", "step_run": "rmade0000001"}, ())  # created; the crash after
        await _step(releases, store)
        assert _runs(store) == 1


@pytest.mark.anyio
async def test_a_fresh_step_stores_its_run_id_and_two_drivers_at_once_make_one_run(store: Store,
                                                                                    tmp_path: Path) -> None:
    async with _releases(store, tmp_path) as releases:
        await _step(releases, store)
        rel = store.release(REL)
        assert rel is not None and rel["step_run"] and store.run_exists(rel["step_run"]) and _runs(store) == 1
        # the old lease holder's create and the new one's, for one stored id: the second follows
        command = ("shell", {"script": "echo pre"})
        await releases._create_step_run(REL, "rtwice000001", command, list(AGENTS), 5.0)
        await releases._create_step_run(REL, "rtwice000001", command, list(AGENTS), 5.0)
        assert _runs(store) == 2
