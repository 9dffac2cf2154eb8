"""Online self-update with a graceful handover, on real agents running real builds (zipapps
made by scripts/build_agent.py, stamped with another version)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import Fleet, wait_for
from hcsdk import Client
from hcsdk.common.version import __version__

ROOT = Path(__file__).resolve().parents[1]
NEW = "9.9.9+update-test"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("builds")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_agent.py"), "--only", "pyz", "--version", NEW,
                    "--out", str(out)], check=True, capture_output=True)
    crash = out / "crash" / "zy-agent.pyz"
    crash.parent.mkdir()
    with zipfile.ZipFile(crash, "w") as zf:
        zf.writestr("__main__.py", "import sys\nprint('this build is broken', file=sys.stderr)\nsys.exit(3)\n")
    hang = out / "hang" / "zy-agent.pyz"
    hang.parent.mkdir()
    with zipfile.ZipFile(hang, "w") as zf:
        zf.writestr("__main__.py", "import time\ntime.sleep(600)\n")
    return {"good": out / "zy-agent.pyz", "crash": crash, "hang": hang}


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("update"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    for name in ("u-1", "u-2", "u-3", "u-4", "u-5", "u-6", "u-7", "u-8"):
        fleet.start_agent(name, {"role": "upd"})
    fleet.start_agent("u-poll", extra=["--no-http2"])
    fleet.start_agent("u-proxied", extra=["--master", fleet.start_proxy("hk")])
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()
        _kill_under(fleet.root)  # new builds run in sessions of their own


def _kill_under(root: Path) -> None:
    """Processes started from this fleet's directories that the fleet does not know of."""
    for pid in _pids_with(str(root)):
        if pid != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _whoami(client: Client, name: str) -> tuple[str, int]:
    df = client.run("echo $ZY_AGENT_VERSION $ZY_AGENT_PID", targets=name, timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok", df.loc[0, "error"]
    version, pid = str(df.loc[0, "stdout"]).split()
    return version, int(pid)


def _events(fl: Fleet, run_id: str) -> list[dict[str, Any]]:
    """Every event the master stored for a run, as its event stream gives them."""
    import httpx

    from hcsdk.protocol.wire import loads

    resp = httpx.get(f"{fl.url}/api/v1/runs/{run_id}/events", headers={"authorization": f"Bearer {fl.admin_token}"},
                     verify=ssl.create_default_context(cafile=str(fl.root / "master" / "ca.pem")), timeout=30)
    return [loads(line) for line in resp.text.splitlines() if line.strip()]


def test_a_long_task_outlives_the_update_and_reports_once(fl: Fleet, builds: dict[str, Path]) -> None:
    client = fl.client
    before_version, old_pid = _whoami(client, "u-1")
    assert before_version == __version__
    long = client.run("sleep 3; echo finished on $ZY_AGENT_VERSION", targets="u-1", timeout=120)
    for event in long.events():
        if event.kind == "start":
            break
    df = client.agents.update("u-1", build=builds["good"])
    row = df.iloc[0]
    assert row["status"] == "ok", row["error"]
    assert row["version_before"] == __version__ and row["version_after"] == NEW
    out = long.to_dataframe()
    assert out.loc[0, "status"] == "ok" and out.loc[0, "stdout"] == f"finished on {__version__}\n"
    dones = [e for e in _events(fl, long.id) if e.get("kind") == "done"]
    assert len(dones) == 1
    wait_for(lambda: not _alive(old_pid), what="the old agent to exit")
    version, pid = _whoami(client, "u-1")
    assert version == NEW and pid != old_pid
    inv = client.inventory("u-1")
    assert inv.loc[0, "agent_version"] == NEW and bool(inv.loc[0, "online"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[1].split()[0] != "Z"


def test_commands_sent_during_the_switch_run_once_on_the_new_agent(fl: Fleet, builds: dict[str, Path]) -> None:
    client = fl.client
    _, old_pid = _whoami(client, "u-2")
    blob = client.agents.upload_build(builds["good"])
    sent: list[tuple[float, Any]] = []
    stop = threading.Event()

    def fire() -> None:
        while not stop.is_set():
            created = time.time()
            sent.append((created, client.run("echo $ZY_AGENT_VERSION $ZY_AGENT_PID", targets="u-2", timeout=60)))
            time.sleep(0.05)

    firing = threading.Thread(target=fire, daemon=True)
    firing.start()
    time.sleep(0.5)
    update = client.run(cmd="zy.update", args={"sha256": blob["sha256"], "size": blob["size"],
                                               "filename": "zy-agent.pyz"}, targets="u-2", timeout=120)
    result = update.to_dataframe()
    time.sleep(1.0)
    stop.set()
    firing.join()
    assert result.loc[0, "status"] == "ok", result.loc[0, "error"]
    # from here the old agent holds new work (before, it fetched and checked the build)
    switch_began = result.loc[0, "result"]["switch_began"]
    during = 0
    for created, run in sent:
        df = run.to_dataframe()
        assert df.loc[0, "status"] == "ok", df.loc[0, "error"]
        assert len(str(df.loc[0, "stdout"]).splitlines()) == 1
        assert len([e for e in _events(fl, run.id) if e.get("kind") == "done"]) == 1
        version, pid = str(df.loc[0, "stdout"]).split()
        if created > switch_began:
            during += 1
            assert (version, int(pid)) != (__version__, old_pid), f"{run.id} was sent during the switch"
            assert version == NEW
    assert during >= 3


def test_a_build_that_crashes_at_start_is_rolled_back(fl: Fleet, builds: dict[str, Path]) -> None:
    client = fl.client
    _, old_pid = _whoami(client, "u-3")
    df = client.agents.update("u-3", build=builds["crash"], handover_timeout=30)
    assert df.loc[0, "status"] == "failed"
    assert "the new agent exited with code 3 before taking over" in df.loc[0, "error"]
    assert df.loc[0, "version_after"] == __version__
    assert _whoami(client, "u-3") == (__version__, old_pid)  # the old agent serves on
    assert not list((fl.root / "agents" / "u-3" / "builds").iterdir())


def test_a_build_whose_bytes_do_not_match_the_hash_is_refused(fl: Fleet, builds: dict[str, Path]) -> None:
    client = fl.client
    _, old_pid = _whoami(client, "u-4")
    blob = client.agents.upload_build(builds["good"])
    stored = fl.root / "master" / "blobs" / blob["sha256"]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # swapped or corrupted after the hash was taken
    stored.write_bytes(bytes(data))
    try:
        df = client.run(cmd="zy.update", args={"sha256": blob["sha256"], "size": blob["size"]}, targets="u-4",
                        timeout=60).to_dataframe()
    finally:
        stored.unlink()
    assert df.loc[0, "status"] == "failed" and "the signed command says" in df.loc[0, "error"]
    assert _whoami(client, "u-4") == (__version__, old_pid)


def test_batches_stop_after_max_failures(fl: Fleet, builds: dict[str, Path]) -> None:
    client = fl.client
    df = client.agents.update(["u-4", "u-5"], build=builds["crash"], batch_size=1, max_failures=0,
                              handover_timeout=30)
    assert list(df["batch"]) == [1, 2]
    assert list(df["status"]) == ["failed", "skipped"]
    assert "stopped after 1 failures (max_failures=0)" in df.loc[1, "error"]
    df = client.agents.update(["u-4", "u-5"], build=builds["good"], batch_size=2)
    assert list(df["status"]) == ["ok", "ok"] and list(df["version_after"]) == [NEW, NEW]


@pytest.mark.parametrize("name", ["u-proxied", "u-poll"])
def test_update_behind_a_proxy_and_over_polling(fl: Fleet, builds: dict[str, Path], name: str) -> None:
    """The build comes through the proxy; the proxy keeps the old connection's uplink while the
    new one takes the downlink. Polling agents hand over the same way."""
    client = fl.client
    _, old_pid = _whoami(client, name)
    long = client.run("sleep 2; echo finished", targets=name, timeout=120)
    for event in long.events():
        if event.kind == "start":
            break
    df = client.agents.update(name, build=builds["good"])
    assert df.loc[0, "status"] == "ok", df.loc[0, "error"]
    assert df.loc[0, "version_after"] == NEW
    assert long.to_dataframe().loc[0, "stdout"] == "finished\n"
    assert len([e for e in _events(fl, long.id) if e.get("kind") == "done"]) == 1
    version, pid = _whoami(client, name)
    assert version == NEW and pid != old_pid


def test_systemd_follows_the_new_agent(fl: Fleet, builds: dict[str, Path], tmp_path: Path) -> None:
    """Under systemd (Type=notify, NotifyAccess=all) the old agent says READY once connected,
    and the new one names itself the main process when it takes over."""
    import socket

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        fl.start_agent("u-sd", wrap=["env", f"NOTIFY_SOCKET={path}"])
        fl.wait_online("u-sd")
        assert sock.recv(1024) == b"READY=1"
        df = fl.client.agents.update("u-sd", build=builds["good"])
        assert df.loc[0, "status"] == "ok", df.loc[0, "error"]
        _, new_pid = _whoami(fl.client, "u-sd")
        assert sock.recv(1024) == f"MAINPID={new_pid}\nREADY=1".encode()


def test_an_update_names_an_uploaded_build(fl: Fleet) -> None:
    from hcsdk import RequestError

    for sha in ("../master.db", "0" * 64):
        with pytest.raises(RequestError, match="no build with SHA-256"):
            fl.client.run(cmd="zy.update", args={"sha256": sha, "size": 1}, targets="u-1")


def _upload_and_update(fl: Fleet, name: str, build: Path, **extra: Any) -> Any:
    blob = fl.client.agents.upload_build(build)
    args = {"sha256": blob["sha256"], "size": blob["size"], "filename": build.name, **extra}
    return fl.client.run(cmd="zy.update", args=args, targets=name, timeout=120)


def test_an_updated_agent_restarted_by_its_service_comes_back_as_the_new_build(fl: Fleet,
                                                                             builds: dict[str, Path]) -> None:
    assert fl.client.agents.update("u-5", build=builds["good"]).loc[0, "status"] == "ok"
    fl.agents["u-5"].popen.wait(timeout=60)  # the old agent exits once its uplink is done
    fl.agents["u-5"].stop()
    _, pid = _whoami(fl.client, "u-5")
    os.kill(pid, signal.SIGKILL)  # a crash, a reboot: the service starts what it always started
    wait_for(lambda: not _alive(pid), what="the agent to die")
    fl.start_agent("u-5")
    fl.wait_online("u-5")
    version, new_pid = _whoami(fl.client, "u-5")
    assert version == NEW and new_pid != pid
    current = fl.root / "agents" / "u-5" / "builds" / "current.json"
    assert json.loads(current.read_text())["path"].endswith("zy-agent.pyz")


def test_a_plain_sigterm_during_an_update_is_a_stop(fl: Fleet, builds: dict[str, Path]) -> None:
    """Only the new agent's recorded takeover makes SIGTERM a handover: an operator's stop while
    the new build starts stops the agent and abandons the update."""
    _, pid = _whoami(fl.client, "u-6")
    run = _upload_and_update(fl, "u-6", builds["hang"], handover_timeout=120)
    state = fl.root / "agents" / "u-6"
    wait_for(lambda: any(state.glob("builds/*/zy-agent.pyz")), what="the build to be installed")
    time.sleep(1)  # the hanging build has been started
    hanging = [p for p in _pids_with(str(state / "builds")) if p != pid]
    os.kill(pid, signal.SIGTERM)
    fl.agents["u-6"].popen.wait(timeout=60)
    fl.agents["u-6"].stop()
    wait_for(lambda: not any(_alive(p) for p in hanging), what="the new build to be killed with the update")
    fl.start_agent("u-6")
    fl.wait_online("u-6")
    assert _whoami(fl.client, "u-6")[0] == __version__
    assert run.to_dataframe().loc[0, "status"] != "ok"


def test_a_new_agent_that_dies_after_taking_over_gives_the_channel_back(fl: Fleet,
                                                                       builds: dict[str, Path]) -> None:
    client = fl.client
    _, old_pid = _whoami(client, "u-7")
    long = client.run("sleep 6; echo survived", targets="u-7", timeout=120)
    for event in long.events():
        if event.kind == "start":
            break
    run = _upload_and_update(fl, "u-7", builds["good"])
    record = fl.root / "agents" / "u-7" / "handover.json"
    wait_for(lambda: "handing over to the new build" in fl.agents["u-7"].output(),
             what="the old agent to start handing over")
    new_pid = json.loads(record.read_text())["pid"]
    os.kill(new_pid, signal.SIGKILL)  # dies while the old agent is still finishing its task
    df = run.to_dataframe()
    assert df.loc[0, "status"] == "failed", df.loc[0, "error"]
    assert "the new agent exited with code -9 after taking over" in df.loc[0, "error"]
    out = long.to_dataframe()
    assert out.loc[0, "status"] == "ok" and out.loc[0, "stdout"] == "survived\n"
    assert len([e for e in _events(fl, long.id) if e.get("kind") == "done"]) == 1
    assert wait_for(lambda: _whoami(client, "u-7"), what="the old agent serving again") == (__version__, old_pid)
    assert not (fl.root / "agents" / "u-7" / "builds" / "current.json").exists()


def _pids_with(mark: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if mark.encode() in fh.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_a_task_the_old_agent_finishes_can_still_be_cancelled(fl: Fleet, builds: dict[str, Path]) -> None:
    """After the switch the master sends everything to the new agent, cancels too: it passes
    them to the old one through the spool they share."""
    client = fl.client
    long = client.run("sleep 300", targets="u-8", timeout=600)
    for event in long.events():
        if event.kind == "start":
            break
    run = _upload_and_update(fl, "u-8", builds["good"])
    wait_for(lambda: "handing over to the new build" in fl.agents["u-8"].output(),
             what="the old agent to start handing over")
    long.cancel()
    assert long.to_dataframe().loc[0, "status"] == "cancelled"
    assert run.to_dataframe().loc[0, "status"] == "ok"
    assert _whoami(client, "u-8")[0] == NEW
