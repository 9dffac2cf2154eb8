"""A data dir made by the master as it was before schema versions (tests/data/store-v0, made
with tests/data/make_store_fixture.py by the code at 52043b6) is upgraded in place: the new
master starts on it and everything is still there, an agent enrolled then reconnects with its
old credential, and a second start applies no migration again. Also the migration runner on
its own: only what is missing is applied, and a migration that fails leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet import Fleet
from master.store.migrate import MIGRATIONS, migrate, migrations
from master.store.sqlite_base import FINAL_SQL

FIXTURE = Path(__file__).parent / "data" / "store-v0"
FACTS: dict[str, Any] = json.loads((FIXTURE / "facts.json").read_text())
TABLES = ("meta", "join_tokens", "agents", "runs", "tasks", "events", "schedules", "samples", "artifacts",
          "releases", "release_targets")


def _read(db: Path, sql: str, mode: str = "mode=ro") -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?{mode}", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def _counts(db: Path) -> dict[str, int]:
    return {t: _read(db, f"SELECT COUNT(*) FROM {t}")[0][0] for t in TABLES}


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("upgrade")
    shutil.copytree(FIXTURE / "master", root / "master")
    shutil.copytree(FIXTURE / "agent-old-1", root / "agents" / "old-1")
    fleet = Fleet(root, ["--offline-grace", "5", "--heartbeat", "2"])
    try:
        yield fleet
    finally:
        fleet.close()


def _api(fl: Fleet, path: str) -> Any:
    ca = ssl.create_default_context(cafile=str(fl.root / "master" / "ca.pem"))
    with httpx.Client(base_url=fl.url, verify=ca,
                      headers={"authorization": f"Bearer {fl.admin_token}"}) as http:
        resp = http.get(path)
        resp.raise_for_status()
        return [json.loads(line) for line in resp.text.splitlines() if line] if path.endswith("/events") \
            else resp.json()


def test_the_fixture_is_from_before_schema_versions() -> None:
    db = FIXTURE / "master" / "master.db"
    # immutable: a read-only open of a WAL database would still leave -wal/-shm files in tests/data
    assert not _read(db, "SELECT 1 FROM sqlite_master WHERE name='schema_version'", "immutable=1")
    assert _read(db, "PRAGMA user_version", "immutable=1") == [(0,)]


def test_an_old_data_dir_is_upgraded_without_loss(fl: Fleet) -> None:
    db = fl.root / "master" / "master.db"
    before = _counts(db)
    fl.start_master()
    assert [v for v, in _read(db, "SELECT version FROM schema_version")] == [m.version for m in migrations()]
    after = _counts(db)
    assert all(after[t] >= before[t] for t in TABLES), (before, after)

    run = _api(fl, f"/api/v1/runs/{FACTS['run_id']}")
    assert sorted(t["status"] for t in run["tasks"]) == ["ok", "ok"] and run["open"] == 0
    out = {e["uuid"]: e["data"]["data"] for e in _api(fl, f"/api/v1/runs/{FACTS['run_id']}/events")
           if e.get("kind") == "out"}
    assert {out[u].strip() for u in FACTS["uuids"].values()} == {"hello-from-old-1", "hello-from-old-2"}

    inv = fl.client.inventory()
    assert set(FACTS["uuids"].values()) <= set(inv["uuid"])
    assert FACTS["token_id"] in {t["id"] for t in fl.client.join_tokens()}
    assert fl.client.artifacts.get(FACTS["artifact"])["name"] == "app.txt"
    rel = fl.client.get_release(FACTS["release"])
    assert rel.state == "done" and list(rel.progress()["status"]) == ["ok", "ok"]
    assert "fourty" in set(fl.client.schedules()["name"])
    assert len(fl.client.series("fourty")) >= 4


def test_an_agent_enrolled_by_the_old_master_reconnects(fl: Fleet) -> None:
    fl.start_agent("old-1")  # its identity (uuid, credential) is from the fixture: no join token
    fl.wait_online("old-1")
    df = fl.client.run("echo again-$ZY_HOSTNAME", targets=FACTS["uuids"]["old-1"]).to_dataframe()
    assert list(df["status"]) == ["ok"] and df["stdout"].iloc[0].strip() == "again-old-1"


def test_a_second_start_applies_nothing_again(fl: Fleet) -> None:
    db = fl.root / "master" / "master.db"
    first = _read(db, "SELECT version, name, applied_at FROM schema_version ORDER BY version")
    counts = _counts(db)
    fl.restart_master(kill=False)
    assert _read(db, "SELECT version, name, applied_at FROM schema_version ORDER BY version") == first
    assert all(v >= counts[t] for t, v in _counts(db).items())
    assert FACTS["token_id"] in {t["id"] for t in fl.client.join_tokens()}


# -- the runner on its own ------------------------------------------------------------------

def _with(tmp_path: Path, extra: dict[str, str]) -> Path:
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    for name, sql in extra.items():
        (folder / name).write_text(sql)
    return folder


def _conn(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _next() -> int:
    """The number a migration after the shipped ones takes."""
    return len(migrations()) + 1


def test_only_missing_migrations_are_applied(tmp_path: Path) -> None:
    with contextlib.closing(_conn(tmp_path / "m.db")) as db:
        assert migrate(db) == [m.version for m in migrations()]
        assert migrate(db) == []
        folder = _with(tmp_path, {f"{_next():04d}_notes.sql": "CREATE TABLE notes (id TEXT PRIMARY KEY);\n"})
        assert migrate(db, folder) == [_next()]
        assert migrate(db, folder) == []
        assert db.execute("SELECT COUNT(*) FROM notes").fetchone() == (0,)


def test_a_failing_migration_leaves_the_schema_as_it_was(tmp_path: Path) -> None:
    broken = "CREATE TABLE half (id TEXT);\nINSERT INTO nowhere VALUES (1);\n"
    folder = _with(tmp_path, {f"{_next():04d}_broken.sql": broken})
    with contextlib.closing(_conn(tmp_path / "m.db")) as db:
        with pytest.raises(sqlite3.OperationalError, match="nowhere"):
            migrate(db, folder)
        # nothing of the shipped ones either: one transaction for the whole upgrade
        assert db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall() == []


def test_the_open_task_index_names_the_final_statuses() -> None:
    """0001 spells the final statuses out (a schema is frozen text); they must stay the protocol's."""
    assert f"status NOT IN {FINAL_SQL}" in (MIGRATIONS / "0001_initial.sql").read_text()


def test_a_store_from_a_newer_master_is_refused(tmp_path: Path) -> None:
    from master.store import SchemaError

    with contextlib.closing(_conn(tmp_path / "m.db")) as db:
        migrate(db, _with(tmp_path, {f"{_next():04d}_later.sql": "CREATE TABLE later (id TEXT);\n"}))
        with pytest.raises(SchemaError, match=f"schema version {_next()}"):
            migrate(db)


