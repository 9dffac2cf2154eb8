"""`zy master migrate-store`: a SQLite data dir made by a real master (agents enrolled, runs with
results, an artifact, a schedule with samples) is copied into PostgreSQL, and a master started
on that store with the same data dir serves it: every agent reconnects unchanged with its old
credential, old runs read back with their events, a new run works and its event ids continue
after the old ones, the schedule keeps sampling. Also what it refuses, and that a refusal
writes nothing: a non-empty target, a damaged source, a data dir a master is running on, an
unreachable PostgreSQL, a folder that is not a data dir."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from fleet import ZY, Fleet, wait_for
from hcsdk.net.serve import lock_dir
from master.bootstrap import SEALED_ADMIN, SEALED_CA, SEALED_COMPLETE, SEALED_E2E, SEALED_PROXY_CA
from master.keyring import CHECK_NAME
from master.store.copy import SEALED_META

AGENTS = ("mig-1", "mig-2")
ARGS = ["--offline-grace", "3", "--heartbeat", "2"]
SAMPLE = "echo '{\"n\": 1}'"


def _api(fl: Fleet, path: str) -> Any:
    ca = ssl.create_default_context(cafile=str(fl.root / "master" / "ca.pem"))
    with httpx.Client(base_url=fl.url, verify=ca, headers={"authorization": f"Bearer {fl.admin_token}"},
                      timeout=30) as http:
        resp = http.get(path)
        resp.raise_for_status()
        return [json.loads(line) for line in resp.text.splitlines() if line] if "/events" in path else resp.json()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A fleet's root whose master (on SQLite) is stopped, and what it held."""
    root = tmp_path_factory.mktemp("migrate")
    fl = Fleet(root, ARGS)
    try:
        fl.start_master()
        for name in AGENTS:
            fl.start_agent(name, {"role": "mig"})
        fl.wait_online()
        run = fl.client.run("echo hello-$ZY_HOSTNAME", targets="label:role=mig")
        assert sorted(run.to_dataframe()["status"]) == ["ok", "ok"]
        (root / "app.txt").write_bytes(b"an artifact\n" * 1000)
        artifact = fl.client.artifacts.upload(root / "app.txt")
        fl.client.schedule("shell", every="1s", targets="label:role=mig", args={"script": SAMPLE}, name="tick")
        wait_for(lambda: len(fl.client.series("tick")) >= 4, what="samples of the schedule")
        facts = {"root": root, "uuids": {n: fl.uuid_of(n) for n in AGENTS}, "run": run.id,
                 "events": _api(fl, f"/api/v1/runs/{run.id}/events"),
                 "stored_events": _api(fl, f"/api/v1/runs/{run.id}/events?folded=1"), "artifact": artifact["id"],
                 "tokens": {t["id"] for t in fl.client.join_tokens()}}
    finally:
        fl.close()
    facts["samples"] = _sqlite_count(root, "samples")
    yield facts


def _sqlite_count(root: Path, table: str) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{root / 'master' / 'master.db'}?mode=ro", uri=True) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _migrate(data_dir: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZY, "master", "migrate-store", "--from", str(data_dir), "--to", url],
                          capture_output=True, text=True, timeout=120)


def _pg(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


def _tables(url: str) -> set[str]:
    return {r[0] for r in _pg(url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}


def test_a_migrated_data_dir_serves_its_agents_and_runs_from_postgresql(made: dict[str, Any], pg_url: str) -> None:
    root: Path = made["root"]
    done = _migrate(root / "master", pg_url)
    assert done.returncode == 0, done.stderr
    assert "agents" in done.stderr and "events" in done.stderr and "next:" in done.stderr
    assert _pg(pg_url, "SELECT count(*) FROM agents")[0][0] == len(AGENTS)
    assert _pg(pg_url, "SELECT count(*) FROM samples")[0][0] == made["samples"]

    fl = Fleet(root, ARGS)  # the same data dir: its CA, keys and admin token go into the store
    try:
        fl.start_master(extra=["--store", pg_url])
        for name in AGENTS:  # unchanged: the identity (uuid, credential) they enrolled with
            fl.start_agent(name, {"role": "mig"})
        fl.wait_online()
        inv = fl.client.inventory()
        assert sorted(inv["uuid"]) == sorted(made["uuids"].values())  # nobody enrolled again
        assert made["tokens"] <= {t["id"] for t in fl.client.join_tokens()}

        old = _api(fl, f"/api/v1/runs/{made['run']}")
        assert sorted(t["status"] for t in old["tasks"]) == ["ok", "ok"]
        assert _api(fl, f"/api/v1/runs/{made['run']}/events") == made["events"]
        assert fl.client.artifacts.get(made["artifact"])["name"] == "app.txt"

        run = fl.client.run("echo again-$ZY_HOSTNAME", targets="label:role=mig")
        df = run.to_dataframe()
        assert sorted(df["status"]) == ["ok", "ok"]
        assert sorted(s.strip() for s in df["stdout"]) == ["again-mig-1", "again-mig-2"]
        new = _api(fl, f"/api/v1/runs/{run.id}/events")
        assert min(e["id"] for e in new) > max(e["id"] for e in made["events"])  # cursors continue

        # the schedule went across: the agents keep sampling into the new store
        wait_for(lambda: _pg(pg_url, "SELECT count(*) FROM samples")[0][0] > made["samples"],
                 what="a new sample in PostgreSQL")
    finally:
        fl.close()


def test_blob_files_go_into_a_store_that_keeps_blobs(made: dict[str, Any], pg_url: str) -> None:
    source = made["root"] / "master"
    files = {p.name for p in (source / "blobs").iterdir() if not p.name.startswith(".")}
    done = _migrate(_copy_of(source, made["root"].parent / "blobs-case"), pg_url)
    assert done.returncode == 0, done.stderr
    if "blobs" not in _tables(pg_url):
        assert "blob files stay in" in done.stderr
        return
    assert {r[0] for r in _pg(pg_url, "SELECT sha256 FROM blobs")} == files
    assert f"copied {len(files)} blob files" in done.stderr


def _copy_of(data_dir: Path, where: Path) -> Path:
    """A copy of the data dir (cut from the lock and the port file of the original's master)."""
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(data_dir, where)
    return where


def test_a_store_that_holds_anything_is_refused_and_left_as_it_was(made: dict[str, Any], pg_url: str,
                                                                    tmp_path: Path) -> None:
    source = _copy_of(made["root"] / "master", tmp_path / "d")
    assert _migrate(source, pg_url).returncode == 0
    before = _pg(pg_url, "SELECT count(*) FROM agents")[0][0], _pg(pg_url, "SELECT count(*) FROM events")[0][0]
    again = _migrate(source, pg_url)
    assert again.returncode == 2
    assert "not empty" in again.stderr and "agents: 2 rows" in again.stderr, again.stderr
    assert (_pg(pg_url, "SELECT count(*) FROM agents")[0][0], _pg(pg_url, "SELECT count(*) FROM events")[0][0]) \
        == before


def test_a_damaged_source_is_refused_before_anything_is_written(made: dict[str, Any], pg_url: str,
                                                               tmp_path: Path) -> None:
    source = _copy_of(made["root"] / "master", tmp_path / "d")
    db = source / "master.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])  # a truncated copy (a disk full, a backup cut short)
    done = _migrate(source, pg_url)
    assert done.returncode == 2
    assert "master.db" in done.stderr and ("damaged" in done.stderr or "not a readable" in done.stderr), done.stderr
    assert _tables(pg_url) == set()  # not even the schema: the source is checked first


def test_garbage_in_place_of_the_store_is_refused(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "master.db").write_bytes(b"this is not a database" * 100)
    done = _migrate(tmp_path, pg_url)
    assert done.returncode == 2 and "not a readable SQLite database" in done.stderr, done.stderr
    assert _tables(pg_url) == set()


def test_a_data_dir_a_master_is_running_on_is_refused(made: dict[str, Any], pg_url: str, tmp_path: Path) -> None:
    source = _copy_of(made["root"] / "master", tmp_path / "d")
    held = lock_dir(source, "master")  # what a running master holds
    try:
        done = _migrate(source, pg_url)
    finally:
        held.close()
    assert done.returncode == 2 and "another master is running" in done.stderr and "stop that master" in done.stderr
    assert _tables(pg_url) == set()


@pytest.mark.parametrize("make", ["missing", "empty", "other"])
def test_a_folder_that_is_not_a_data_dir_is_refused(tmp_path: Path, pg_url: str, make: str) -> None:
    folder = tmp_path / "nothing"
    if make == "empty":
        folder.mkdir()
    elif make == "other":
        import sqlite3

        folder.mkdir()
        with sqlite3.connect(folder / "master.db") as db:
            db.execute("CREATE TABLE t (x)")
    done = _migrate(folder, pg_url)
    assert done.returncode == 2, done.stderr
    assert ("not a master's data dir" in done.stderr) if make != "other" else ("not a master's store" in done.stderr)
    assert _tables(pg_url) == set()


def test_an_unreachable_postgresql_is_a_clear_error(made: dict[str, Any], tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = _copy_of(made["root"] / "master", tmp_path / "d")
    done = _migrate(source, f"postgresql://zy:secret@127.0.0.1:{port}/nowhere")
    assert done.returncode == 2 and "cannot reach or open the PostgreSQL store" in done.stderr, done.stderr
    assert "secret" not in done.stderr  # the password stays out of messages
    assert _migrate(source, "mysql://x@y/z").returncode == 2


def test_the_sealed_secrets_are_never_copied() -> None:
    """The copy leaves out every meta key the cluster's keyring seals (a SQLite store has none; a
    copied one would be sealed under another cluster's key)."""
    for name in (CHECK_NAME, SEALED_CA, SEALED_PROXY_CA, SEALED_E2E, SEALED_ADMIN, SEALED_COMPLETE):
        assert name == SEALED_META[0] or name.startswith(SEALED_META[1]), name


def _by(rows: list[Any], key: str) -> list[Any]:
    return sorted(rows, key=lambda r: str(r[key]))


def test_the_store_api_reads_the_same_from_both_stores(made: dict[str, Any], pg_url: str, tmp_path: Path) -> None:
    """Lose nothing, in the store's own terms: every record the master reads is equal (keys as
    bytes, flags as bools, JSON decoded) whether it comes from SQLite or from the copy."""
    from master.store.copy import copy_store
    from master.store.postgres import open_postgres
    from master.store.sqlite import SQLiteStore

    source = _copy_of(made["root"] / "master", tmp_path / "d")
    calls: list[tuple[str, int, int]] = []
    counts = copy_store(source / "master.db", pg_url, lambda t, n, total: calls.append((t, n, total)))
    old, new = SQLiteStore(source / "master.db"), open_postgres(pg_url)
    try:
        assert counts["agents"] == len(AGENTS) and counts["events"] == _pg(pg_url, "SELECT count(*) FROM events")[0][0]
        # (one line per stored event only when folded: unfolded, a done's output is lines of its own)
        assert counts["events"] >= len(made["stored_events"]) > 0
        last = {t: (n, total) for t, n, total in calls}
        assert all(n == total == counts[t] for t, (n, total) in last.items() if t != "blobs")
        assert _by(new.agents(include_revoked=True), "uuid") == _by(old.agents(include_revoked=True), "uuid")
        for a in old.agents():
            assert new.agent(a["uuid"]) == a and isinstance(a["e2e_key"], bytes) and a["e2e_key"]
        assert _by(new.join_tokens(), "id") == _by(old.join_tokens(), "id")
        assert new.run(made["run"]) == old.run(made["run"])
        assert new.events_after(made["run"], 0) == old.events_after(made["run"], 0)
        assert new.run_outcomes(made["run"]) == old.run_outcomes(made["run"])
        assert new.schedules() == old.schedules() and new.schedule_specs() == old.schedule_specs()
        assert new.series("tick", None, None, 10_000) == old.series("tick", None, None, 10_000)
        assert _by(new.artifacts(), "id") == _by(old.artifacts(), "id")
        for key in ("admin_token_hash", "peer_secret"):
            assert new.get_meta(key) == old.get_meta(key)
    finally:
        old.close()
        new.close()


def test_what_postgresql_cannot_hold_as_is(made: dict[str, Any], pg_url: str, tmp_path: Path) -> None:
    """A NUL in a text (PostgreSQL refuses it) becomes U+FFFD as the PostgreSQL store makes it;
    sealed meta values are left out; a sequence goes past ids SQLite handed out and deleted since
    (retention), so no new id repeats one an SDK cursor has seen."""
    import sqlite3

    source = _copy_of(made["root"] / "master", tmp_path / "d")
    with sqlite3.connect(source / "master.db") as db:
        db.execute("UPDATE tasks SET error = ? WHERE taskid = (SELECT min(taskid) FROM tasks)", ("bad\x00byte",))
        db.execute("INSERT INTO meta(k, v) VALUES ('sealed.ca', 'v1:xx'), ('keyring_check', 'v1:yy')")
        top = db.execute("SELECT max(id) FROM events").fetchone()[0]
        db.execute("DELETE FROM events WHERE id = ?", (top,))
    done = _migrate(source, pg_url)
    assert done.returncode == 0, done.stderr
    assert _pg(pg_url, "SELECT error FROM tasks WHERE error LIKE 'bad%'") == [("bad\ufffdbyte",)]
    assert _pg(pg_url, "SELECT k FROM meta WHERE k = 'keyring_check' OR k LIKE 'sealed.%'") == []
    assert _pg(pg_url, "SELECT max(id) FROM events")[0][0] == top - 1
    assert _pg(pg_url, "SELECT nextval(pg_get_serial_sequence('events', 'id'))")[0][0] == top + 1


def test_a_row_postgresql_refuses_late_in_the_copy_rolls_everything_back(made: dict[str, Any], pg_url: str,
                                                                         tmp_path: Path) -> None:
    import sqlite3

    source = _copy_of(made["root"] / "master", tmp_path / "d")
    with sqlite3.connect(source / "master.db") as db:  # SQLite keeps text in an INTEGER column
        db.execute("UPDATE tasks SET exit_code = 'not a number' WHERE taskid = (SELECT max(taskid) FROM tasks)")
    done = _migrate(source, pg_url)
    assert done.returncode == 2 and "PostgreSQL refused the copy, nothing was kept" in done.stderr, done.stderr
    assert "agents" in done.stderr  # it got that far: the rows copied before are rolled back
    for table in ("agents", "runs", "events", "meta", "tasks"):
        assert _pg(pg_url, f"SELECT count(*) FROM {table}")[0][0] == 0, table
    assert _migrate(source, pg_url).returncode == 2  # still refused by PostgreSQL, not as "not empty"


def test_a_data_dir_from_before_schema_versions_moves_whole(pg_url: str, tmp_path: Path) -> None:
    """tests/data/store-v0 (made by the master before schema versions; see test_store_upgrade):
    copied straight into PostgreSQL, every record reads as the SQLite store reads it once
    upgraded, and its release, artifact and old agent work from a master on the store."""
    from master.store.postgres import open_postgres
    from master.store.sqlite import SQLiteStore

    fixture = Path(__file__).parent / "data" / "store-v0"
    facts: dict[str, Any] = json.loads((fixture / "facts.json").read_text())
    root = tmp_path / "fleet"
    shutil.copytree(fixture / "master", root / "master")
    shutil.copytree(fixture / "agent-old-1", root / "agents" / "old-1")
    shutil.copytree(fixture / "master", tmp_path / "upgraded")
    done = _migrate(root / "master", pg_url)
    assert done.returncode == 0, done.stderr
    old, new = SQLiteStore(tmp_path / "upgraded" / "master.db"), open_postgres(pg_url)
    try:
        assert _by(new.agents(include_revoked=True), "uuid") == _by(old.agents(include_revoked=True), "uuid")
        assert new.run(facts["run_id"]) == old.run(facts["run_id"])
        assert new.events_after(facts["run_id"], 0) == old.events_after(facts["run_id"], 0)
        assert new.release(facts["release"]) == old.release(facts["release"])
        assert new.release_targets(facts["release"]) == old.release_targets(facts["release"])
        assert new.artifact(facts["artifact"]) == old.artifact(facts["artifact"])
        assert new.series("fourty", None, None, 10_000) == old.series("fourty", None, None, 10_000)
    finally:
        old.close()
        new.close()

    ca = (root / "master" / "ca.pem").read_bytes()
    fl = Fleet(root, ARGS)
    try:
        fl.start_master(extra=["--store", pg_url])
        assert (root / "master" / "ca.pem").read_bytes() == ca  # the agents' CA went into the store as it was
        assert (root / "master" / "cluster.key").exists()
        fl.start_agent("old-1")  # the fixture's identity: no join token
        fl.wait_online("old-1")
        df = fl.client.run("echo moved-$ZY_HOSTNAME", targets=facts["uuids"]["old-1"]).to_dataframe()
        assert list(df["status"]) == ["ok"] and df["stdout"].iloc[0].strip() == "moved-old-1"
        rel = fl.client.get_release(facts["release"])
        assert rel.state == "done" and list(rel.progress()["status"]) == ["ok", "ok"]
    finally:
        fl.close()
