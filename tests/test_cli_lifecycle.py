"""`zy plugins`, `zy schedule`, `zy series`, `zy agents update` and `zy run --arg` against a
real master and agent."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from fleet import ZY, Fleet, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("cli-life"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    fleet.start_agent("c-1")
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()
        subprocess.run(["pkill", "-9", "-f", str(fleet.root)], check=False)  # an updated agent


def _zy(fl: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**fl.env, "ZY_CONFIG": str(fl.config_path), "COLUMNS": "200"}
    return subprocess.run([*ZY, *args], capture_output=True, text=True, env=env, timeout=120)


def test_plugins_from_the_shell(fl: Fleet, tmp_path: Path) -> None:
    plugin = tmp_path / "greet.py"
    plugin.write_text(textwrap.dedent('''
        from agent.plugins.api import Arg, command

        VERSION = "2.1"

        @command("greet.hi", args={"name": Arg(str)})
        def hi(ctx, name):
            ctx.out(f"hi {name}\\n")
    '''))
    res = _zy(fl, "plugins", "install", str(plugin), "-t", "c-1", "--output", "json")
    assert res.returncode == 0, res.stderr
    # dtype=False: the version stays the string the plugin declared (pandas would make it 2.1)
    row = pd.read_json(io.StringIO(res.stdout), lines=True, dtype=False).iloc[0]
    assert (row["status"], row["version"]) == ("ok", "2.1"), res.stdout
    res = _zy(fl, "run", "-t", "c-1", "--cmd", "greet.hi", "--arg", "name=ops", "--output", "full")
    assert res.returncode == 0 and "hi ops" in res.stdout, res.stdout + res.stderr
    res = _zy(fl, "run", "-t", "c-1", "--cmd", "greet.hi")
    assert res.returncode == 1 and "args.name is required" in res.stdout
    res = _zy(fl, "plugins", "list", "-t", "c-1")
    assert res.returncode == 0 and "greet" in res.stdout and "file.read" in res.stdout
    res = _zy(fl, "plugins", "remove", "greet", "-t", "c-1")
    assert res.returncode == 0, res.stdout
    res = _zy(fl, "plugins", "remove", "greet", "-t", "c-1")
    assert res.returncode == 1 and "no installed plugin 'greet'" in res.stdout


def test_schedule_and_series_from_the_shell(fl: Fleet) -> None:
    res = _zy(fl, "schedule", "add", "echo", "--every", "1s", "-t", "c-1", "--arg", "text=12", "--name", "twelve")
    assert res.returncode == 0 and "schedule twelve: echo every 1s" in res.stderr, res.stderr

    def samples() -> pd.DataFrame | None:
        out = _zy(fl, "series", "twelve").stdout
        df = pd.read_csv(io.StringIO(out)) if out.strip() else None
        return df if df is not None and len(df) >= 2 else None

    df = wait_for(lambda: (d := samples()) is not None and (d,), what="samples in CSV")[0]
    assert list(df.columns[:3]) == ["time", "uuid", "hostname"] and set(df["value"]) == {12}
    assert "twelve" in _zy(fl, "schedule", "list").stdout
    res = _zy(fl, "schedule", "cancel", "twelve")
    assert res.returncode == 0 and "cancelled schedule twelve" in res.stdout
    assert _zy(fl, "schedule", "cancel", "twelve").returncode == 2  # no such schedule: a clear error


def test_agents_update_from_the_shell(fl: Fleet, tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_agent.py"), "--only", "pyz", "--version", "7.7.7",
                    "--out", str(tmp_path)], check=True, capture_output=True)
    res = _zy(fl, "agents", "update", "-t", "c-1", "--build", str(tmp_path / "zy-agent.pyz"), "--output", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    row = pd.read_json(io.StringIO(res.stdout), lines=True, dtype=False).iloc[0]
    assert row["status"] == "ok" and row["version_after"] == "7.7.7"
    assert "batch 1: 1/1 done, 0 failed" in res.stderr
