"""The `zy` CLI and how the SDK finds a master (ZY_CONFIG, ZY_MASTER/ZY_TOKEN/ZY_CA, ~/.config/zy)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fleet import ZY, Fleet
from hcsdk import Client, ConfigError
from hcsdk.localfleet import pid_alive


def _zy(fleet: Fleet, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {**fleet.env, "ZY_CONFIG": str(fleet.config_path), "COLUMNS": "200"}
    return subprocess.run([*ZY, *args], capture_output=True, text=True, env={**base, **(env or {})}, timeout=60)


def test_zy_run_prints_a_table_and_exit_code_reflects_results(fleet5: Fleet) -> None:
    ok = _zy(fleet5, "run", "-t", "web-*", "--", "echo hello-table")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("hello-table") == 3 and "ok: 3" in ok.stdout
    bad = _zy(fleet5, "run", "-t", "label:role=db", "--timeout", "20", "--", "exit 4")
    assert bad.returncode == 1
    assert "failed: 2" in bad.stdout
    js = _zy(fleet5, "run", "-t", "db-1", "--output", "json", "--", "echo j")
    assert '"status":"ok"' in js.stdout
    slow = _zy(fleet5, "run", "-t", "web-1,db-2", "--timeout", "1", "--", "sleep 30")
    assert slow.returncode == 1 and slow.stdout.count("killed after the 1s timeout") == 2, slow.stdout
    ping = _zy(fleet5, "run", "-t", "web-*", "--cmd", "ping")
    assert ping.returncode == 0 and ping.stdout.count("pong") == 3


def test_zy_errors_are_one_line_without_traceback(fleet5: Fleet) -> None:
    res = _zy(fleet5, "run", "-t", "nobody", "--", "true")
    assert res.returncode == 2
    assert res.stderr.strip() == "zy: unknown target 'nobody' (no agent with that uuid or hostname)"
    res = _zy(fleet5, "inventory", env={"ZY_CONFIG": str(fleet5.root / "missing.toml")})
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_zy_inventory_and_tokens(fleet5: Fleet) -> None:
    inv = _zy(fleet5, "inventory")
    assert inv.returncode == 0 and "5 agents, 5 online" in inv.stdout
    inv = _zy(fleet5, "inventory", "label:role=db")
    assert inv.returncode == 0 and "2 agents, 2 online" in inv.stdout
    created = _zy(fleet5, "token", "create", "--ttl", "10m", "--description", "ci")
    assert created.returncode == 0 and created.stdout.startswith("zyj1.")
    listed = _zy(fleet5, "token", "list")
    assert "ci" in listed.stdout and "valid" in listed.stdout


def test_client_config_discovery(fleet5: Fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("ZY_CONFIG", "ZY_MASTER", "ZY_TOKEN", "ZY_CA"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no master configured"):
        Client()
    monkeypatch.setenv("ZY_CONFIG", str(fleet5.config_path))
    with Client() as c:
        assert len(c.inventory()) == 5
    monkeypatch.delenv("ZY_CONFIG")
    monkeypatch.setenv("ZY_MASTER", fleet5.url)
    monkeypatch.setenv("ZY_TOKEN", fleet5.admin_token)
    monkeypatch.setenv("ZY_CA", str(fleet5.root / "master" / "ca.pem"))
    with Client() as c:
        assert len(c.inventory()) == 5
    for key in ("ZY_MASTER", "ZY_TOKEN", "ZY_CA"):
        monkeypatch.delenv(key)
    user_cfg = tmp_path / "xdg" / "zy" / "client.toml"
    user_cfg.parent.mkdir(parents=True)
    user_cfg.write_text(fleet5.config_path.read_text())
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    with Client() as c:
        assert len(c.inventory()) == 5


def test_master_writes_user_config_unless_told_not_to(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.master_args = []
    import re

    from hcsdk.localfleet import Proc, wait_for

    argv = [*ZY, "master", "--data-dir", str(tmp_path / "m"), "--listen", "127.0.0.1:0"]
    proc = Proc("master", argv, tmp_path / "m.log", fleet.env)
    try:
        wait_for(lambda: re.search("listening on", proc.output()), 30, "master")
        user_cfg = tmp_path / "xdg" / "zy" / "client.toml"
        assert user_cfg.exists() and (tmp_path / "m" / "client.toml").exists()
        assert oct(user_cfg.stat().st_mode & 0o777) == "0o600"
        assert "token" in user_cfg.read_text()
    finally:
        proc.stop()
    user_cfg.unlink()
    argv += ["--no-user-config"]
    proc = Proc("master", argv, tmp_path / "m.log", fleet.env)
    try:
        wait_for(lambda: re.search("listening on", proc.output()), 30, "master")
        assert not user_cfg.exists()
    finally:
        proc.stop()


def test_a_second_master_on_a_taken_port_or_data_dir_refuses_to_start(fleet: Fleet, tmp_path: Path) -> None:
    taken = subprocess.run([*ZY, "master", "--data-dir", str(tmp_path / "other"), "--listen",
                            f"127.0.0.1:{fleet.port}", "--no-user-config"],
                           capture_output=True, text=True, env=fleet.env, timeout=60)
    assert taken.returncode == 2 and "cannot listen on" in taken.stderr
    same_dir = subprocess.run([*ZY, "master", "--data-dir", str(fleet.root / "master"), "--listen", "127.0.0.1:0",
                               "--no-user-config"], capture_output=True, text=True, env=fleet.env, timeout=60)
    assert same_dir.returncode == 2 and "another master is running" in same_dir.stderr


def test_zy_fleet_up_status_down(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZY_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    root = tmp_path / "fleet"

    def zy(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ZY, *args], capture_output=True, text=True, env=env, timeout=120)

    up = zy("fleet", "up", "--root", str(root), "--agents", "2")
    assert up.returncode == 0, up.stderr
    assert f"export ZY_CONFIG={root}/master/client.toml" in up.stdout
    assert "fleet up: master https://127.0.0.1:" in zy("fleet", "up", "--root", str(root)).stdout  # idempotent
    status = zy("fleet", "status", "--root", str(root))
    assert status.returncode == 0 and "web-1 up" in status.stdout and "web-2 up" in status.stdout
    env["ZY_CONFIG"] = str(root / "master" / "client.toml")
    ran = zy("run", "-t", "web-*", "--", "echo in-fleet")
    assert ran.returncode == 0 and ran.stdout.count("in-fleet") == 2
    pids = [int(p) for p in json.loads((root / "fleet.json").read_text())["pids"].values()]
    down = zy("fleet", "down", "--root", str(root))
    assert down.returncode == 0 and "stopped master, web-1, web-2" in down.stdout
    assert zy("fleet", "status", "--root", str(root)).returncode == 1
    for pid in pids:
        assert not pid_alive(pid)
