from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg import PgServer, require_pg_bin
from requires import in_ci

from fleet import Fleet
from master.store import Store, open_store


def pytest_report_header() -> str:
    """Say up front whether a missing facility (nginx, sshd, netns, Chromium) skips or fails."""
    if in_ci():
        return "CI is set: modules missing nginx, sshd, network namespaces or Chromium fail (tests/requires.py)"
    return "CI is not set: modules missing nginx, sshd, network namespaces or Chromium skip, saying why"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL for the session (tests/pg.py); missing PostgreSQL skips, or
    fails under CI (scripts/setup.sh installs it)."""
    require_pg_bin()
    server = PgServer().start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty PostgreSQL database for one test: its URL."""
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store of each kind in turn (SQLite in tmp_path, PostgreSQL in a new database): the
    store tests run the same assertions against both."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    s = open_store(tmp_path, url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fleet5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A master with five agents (web-1..3 role=web, db-1..2 role=db), shared by a module."""
    fleet = Fleet(tmp_path_factory.mktemp("fleet5"), ["--offline-grace", "2", "--heartbeat", "2"])
    fleet.start_master()
    for i in range(1, 4):
        fleet.start_agent(f"web-{i}", {"role": "web", "idc": "hk" if i < 3 else "sg"})
    for i in range(1, 3):
        fleet.start_agent(f"db-{i}", {"role": "db"})
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="session")
def fleet4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The fleet `zy fleet up` makes (web-1..3, db-1 with role/idc labels), for notebooks and
    magics; shared by the whole session, so tests must not break it."""
    from hcsdk.localfleet import DEFAULT_AGENTS

    fleet = Fleet(tmp_path_factory.mktemp("fleet4"))
    fleet.start_master()
    for name, labels in DEFAULT_AGENTS:
        fleet.start_agent(name, labels)
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A fresh master with no agents yet, for tests that break things."""
    f = Fleet(tmp_path, ["--offline-grace", "2", "--heartbeat", "2"])
    f.start_master()
    try:
        yield f
    finally:
        f.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        for name in ("fleet", "fleet5", "fl", "fleet4"):
            fl = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if fl is not None:
                report.sections.append((f"{name} logs", fl.logs()))
