"""notebooks/dr-drill.ipynb executes clean: a PostgreSQL primary and a streaming standby, a master on
the primary with agents, site A killed, the standby promoted, a DR master on it, every agent
answering through it (the notebook asserts that; this checks it ran and said so).

It brings its own PostgreSQL pair (the session's ``pg_server`` cannot be killed and promoted), from
the same binaries (tests/pg.py's ``pg_bin``). Whatever the notebook leaves running (a cell failed
before its clean-up) is ended here by pid: the processes whose command line names its work dir.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nbformat
import papermill
import pytest
from pg import PgServer, pg_bin, require_pg_bin

from fleet import ZY, Fleet, wait_for
from hcsdk.common.jointoken import JoinToken

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "dr-drill.ipynb"
STEPS = ["site A down", "standby promoted", "DR master listening", "every agent on the DR master",
         "every agent answered a run"]


def _pids_naming(workdir: Path) -> list[int]:
    """Processes whose command line names ``workdir`` (only the drill's own are under it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(workdir).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop_everything(workdir: Path, bin_dir: Path) -> None:
    for data in (workdir / "pg-primary", workdir / "pg-standby"):
        if (data / "postmaster.pid").exists():
            cmd = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            subprocess.run(["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd,
                           capture_output=True, timeout=60, check=False)
    for pid in _pids_naming(workdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def drill_dir() -> Iterator[tuple[Path, Path]]:
    bin_dir = require_pg_bin()
    # in /tmp, not pytest's tmp dirs: those are 0700 root, which the postgres user cannot enter
    workdir = Path(tempfile.mkdtemp(prefix="zy-dr-drill-test-"))
    try:
        yield workdir, bin_dir
    finally:
        _stop_everything(workdir, bin_dir)
        shutil.rmtree(workdir, ignore_errors=True)


def test_dr_drill_executes_clean(drill_dir: tuple[Path, Path], tmp_path: Path) -> None:
    workdir, bin_dir = drill_dir
    source = nbformat.read(NOTEBOOK, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in source.cells)
    assert all(c.cell_type != "code" or not c.get("outputs") for c in source.cells), "commit runbooks cleared"
    out = tmp_path / NOTEBOOK.name
    try:
        papermill.execute_notebook(str(NOTEBOOK), str(out), progress_bar=False, kernel_name="python3",
                                   cwd=str(tmp_path), parameters={"workdir": str(workdir), "pg_bin": str(bin_dir),
                                                                  "agents": 3})
    except papermill.PapermillExecutionError as exc:
        logs = "".join(f"\n--- {log}:\n{log.read_text(errors='replace')[-2000:]}" for log in workdir.rglob("*.log"))
        raise AssertionError(f"{exc}{logs}") from None
    executed = nbformat.read(out, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "walreceiver|streaming" in text, "the standby streamed from the primary"
    for step in STEPS:
        assert step in text, f"the timings table has no {step!r}"
    # (the notebook asserts each agent answered on master A, then on the DR master with its old uuid)
    assert re.search(r"drill passed: 3 of 3 agents answered through the DR master", text), text[-3000:]
    assert not _pids_naming(workdir), "the notebook's clean-up left processes running"


def _pg_tool(name: str, *argv: str) -> None:
    bin_dir = pg_bin()
    assert bin_dir is not None
    done = subprocess.run([str(bin_dir / name), *argv], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{name} failed: {done.stderr}"


def test_pg_dump_and_restore_bring_the_control_plane_back(pg_server: PgServer, tmp_path: Path) -> None:
    """docs/deploy.md's backup and restore: pg_dump of a live store, the store lost, pg_restore into
    a new database, a master with an empty data dir and the same key file on it. An agent enrolled
    before the backup reconnects with its credential and runs; one enrolled after it is unknown."""
    source, target = pg_server.new_database(), pg_server.new_database()
    fleet = Fleet(tmp_path / "fleet", ["--offline-grace", "5"], store=source)
    try:
        fleet.start_master()
        # a token naming a DR master that is not running yet, as deploy.md makes them
        dr_url = "https://zy-dr.example.com:8443"
        made = subprocess.run([*ZY, "token", "create", "--master", fleet.url, "--master", dr_url], text=True,
                              capture_output=True, timeout=60, check=False,
                              env={**fleet.env, "ZY_CONFIG": str(fleet.config_path)})
        assert made.returncode == 0, made.stderr
        assert JoinToken.decode(made.stdout.strip()).urls == (fleet.url, dr_url)
        fleet.start_agent("before")
        fleet.wait_online("before")
        old = fleet.client.run("echo hi", targets="before").wait(60).to_dataframe()
        assert list(old["status"]) == ["ok"]
        dump = tmp_path / "zy.dump"
        _pg_tool("pg_dump", "-Fc", "-f", str(dump), "-d", source)  # online: a consistent snapshot
        fleet.start_agent("after")
        fleet.wait_online("after")
        port, uuids = fleet.port, {n: fleet.uuid_of(n) for n in ("before", "after")}

        fleet.stop_master()  # the master host and its database are lost; the key file was kept apart
        shutil.rmtree(fleet.root / "master")
        _pg_tool("pg_restore", "--no-owner", "-d", target, str(dump))
        fleet.store = target
        fleet.start_master(port)  # an empty data dir: everything comes from the restored store
        fleet.wait_online("before", timeout=60)
        inv = fleet.client.inventory()
        assert set(inv["uuid"]) == {uuids["before"]}, "the agent enrolled after the backup is not in it"
        new = fleet.client.run("echo back", targets="before").wait(60).to_dataframe()
        assert list(new["status"]) == ["ok"] and list(new["uuid"]) == [uuids["before"]]
        assert "back" in new["stdout"].iloc[0]
        after = fleet.agents["after"]  # refused, as deploy.md says: it must be enrolled again
        wait_for(lambda: not after.alive, 60, "the agent unknown to the restored store to stop")
        assert "the master refused this agent" in after.output(), after.output()[-1500:]
    finally:
        fleet.close()
