"""The first run, as a new user meets it: the README's commands as written, usage errors,
an 80-column inventory, exec and label mistakes refused clearly, a master restarted on
``--listen HOST:0`` keeping its port, setup.sh against a busy dpkg lock and its output.

Everything runs the real `zy` (the console script in the venv, as a user types it) against real
master and agent processes."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from requires import require

from fleet import ZY, Fleet, wait_for
from hcsdk import TargetError, UsageError

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ZY_SCRIPT = str(VENV_BIN / "zy")  # what `. .venv/bin/activate` puts on the PATH


def _zy(fleet: Fleet | None, *args: str, env: dict[str, str] | None = None,
        columns: int = 80) -> subprocess.CompletedProcess[str]:
    base = dict(fleet.env) if fleet else {k: v for k, v in os.environ.items() if not k.startswith("ZY_")}
    if fleet:
        base["ZY_CONFIG"] = str(fleet.config_path)
    base["COLUMNS"] = str(columns)
    return subprocess.run([ZY_SCRIPT, *args], capture_output=True, text=True, env={**base, **(env or {})},
                          timeout=90)


@pytest.fixture(scope="module")
def dup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three agents: two report the same hostname (agents side by side on one host), one has a
    long hostname and many labels (what makes a table too wide)."""
    fleet = Fleet(tmp_path_factory.mktemp("firstrun"))
    fleet.start_master()
    fleet.start_agent("twin", {"role": "web"}, extra=["--state-dir", str(fleet.root / "agents" / "twin-a")])
    fleet.agents["twin-a"] = fleet.agents.pop("twin")  # so close() stops both
    fleet.start_agent("twin", {"role": "web"}, extra=["--state-dir", str(fleet.root / "agents" / "twin-b")])
    fleet.start_agent("billing-backend-eu-west-1-prod-07.example.internal",
                      {"role": "db", "idc": "frankfurt-3", "team": "payments-platform", "tier": "gold"})
    try:
        wait_for(lambda: fleet.online_count() == 3, 40, "three agents online")
        yield fleet
    finally:
        fleet.close()


# -- usage errors ---------------------------------------------------------------------------------
def test_usage_errors_exit_2_with_the_subcommands_own_usage() -> None:
    bad_flag = _zy(None, "run", "-t", "web-*", "--bogus", "--", "true")
    assert bad_flag.returncode == 2, bad_flag
    assert bad_flag.stderr.startswith("usage: zy run "), bad_flag.stderr
    assert "zy run: error: unrecognized arguments: --bogus" in bad_flag.stderr
    no_script = _zy(None, "run", "-t", "web-*")  # used to exit 1, unlike every other usage error
    assert no_script.returncode == 2 and no_script.stderr.startswith("usage: zy run "), no_script
    assert "give the script after --" in no_script.stderr
    ttl = _zy(None, "token", "create", "--ttl", "soon", env={"ZY_MASTER": "https://127.0.0.1:9", "ZY_TOKEN": "t"})
    assert ttl.returncode == 2 and ttl.stderr.startswith("usage: zy token create"), ttl
    assert "cannot read 'soon' as a duration" in ttl.stderr
    arg = _zy(None, "run", "-t", "web-*", "--cmd", "log.tail", "--arg", "lines")
    assert arg.returncode == 2 and arg.stderr.startswith("usage: zy run "), arg
    assert "--arg wants KEY=TEXT or KEY:=JSON, got 'lines'" in arg.stderr
    inv = _zy(None, "inventory", "--bogus")
    assert inv.returncode == 2 and inv.stderr.startswith("usage: zy inventory"), inv
    for argv in (["bogus"], ["run"], ["master", "--listen", "nowhere"], ["fleet"]):
        res = _zy(None, *argv)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (argv, res)


def test_an_unverified_master_certificate_with_zy_master_hints_at_zy_ca(dup: Fleet) -> None:
    env = {"ZY_CONFIG": "", "ZY_MASTER": dup.url, "ZY_TOKEN": dup.admin_token}
    res = _zy(dup, "inventory", env=env)
    assert res.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in res.stderr, res
    assert "ZY_MASTER is set but ZY_CA is not: set ZY_CA" in res.stderr
    ok = _zy(dup, "inventory", env={**env, "ZY_CA": str(dup.root / "master" / "ca.pem")})
    assert ok.returncode == 0 and "3 agents, 3 online" in ok.stdout, ok


# -- inventory ------------------------------------------------------------------------------------
def test_inventory_fits_80_columns_one_line_per_agent(dup: Fleet) -> None:
    res = _zy(dup, "inventory", columns=80)
    assert res.returncode == 0, res
    lines = res.stdout.rstrip("\n").splitlines()
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, res.stdout
    inv = dup.client.inventory()
    for uuid in inv["uuid"]:
        rows = [line for line in lines if uuid[:8] in line]
        assert len(rows) == 1, (uuid, res.stdout)  # never wrapped over several lines
        assert uuid not in res.stdout  # short uuids by default
    assert "3 agents, 3 online" in res.stdout


def test_inventory_marks_a_hostname_shared_by_several_agents(dup: Fleet) -> None:
    res = _zy(dup, "inventory", columns=80)
    twins = [line for line in res.stdout.splitlines() if line.startswith("twin")]
    assert len(twins) == 2 and all(line.startswith("twin*") for line in twins), res.stdout
    assert "* 2 agents share the hostname 'twin'; target them by uuid" in res.stdout
    billing = [line for line in res.stdout.splitlines() if line.startswith("billing")]
    assert billing and "*" not in billing[0].split()[0], res.stdout


def test_inventory_wide_shows_every_column_and_full_uuids(dup: Fleet) -> None:
    res = _zy(dup, "inventory", "--wide", columns=80)
    assert res.returncode == 0, res
    header = res.stdout.splitlines()[0].split()
    assert header == ["hostname", "uuid", "kind", "online", "mode", "via", "os", "last_seen", "version", "labels"]
    for uuid in dup.client.inventory()["uuid"]:
        assert uuid in res.stdout
    assert "team=payments-platform" in res.stdout and "billing-backend-eu-west-1-prod-07.example.internal" in res.stdout


# -- exec and label selectors ---------------------------------------------------------------------
def test_exec_refuses_a_string_instead_of_splitting_it(dup: Fleet) -> None:
    with pytest.raises(UsageError, match=r"cmd='exec' takes an argv list, e\.g\. \['echo', 'hi'\], not the string"):
        dup.client.run("echo hi", cmd="exec", targets="twin", timeout=20)
    with pytest.raises(UsageError, match="non-empty list of strings"):
        dup.client.run(["echo", 1], cmd="exec", targets="twin", timeout=20)  # type: ignore[list-item]
    df = dup.client.run(["echo", "hi"], cmd="exec", targets="twin", timeout=30).to_dataframe()
    assert list(df["stdout"]) == ["hi\n", "hi\n"] and (df["status"] == "ok").all()


def test_the_agent_refuses_a_string_argv_that_got_past_the_sdk(dup: Fleet) -> None:
    """A schedule's args are checked by the agent's own exec schema (the master stores them as
    given): a string argv is refused there with the reason, never started as 'e'."""
    sched = dup.client.schedule("exec", "1h", targets="twin", args={"argv": "echo hi"}, name="first-run-exec")
    try:
        df = sched.agents()  # waits for each agent's answer
        assert len(df) == 2, df
        assert (df["status"] == "error").all(), df
        assert df["error"].str.contains(r"args\.argv must be a list", regex=True).all(), list(df["error"])
    finally:
        dup.client.cancel_schedule("first-run-exec")


def test_label_selector_with_an_empty_value_is_an_error(dup: Fleet) -> None:
    with pytest.raises(TargetError, match=r"'role=' has an empty value \(write role=VALUE, or role alone"):
        dup.client.run("true", targets="label:role=", timeout=20)
    with pytest.raises(TargetError, match="has an empty value"):
        dup.client.inventory("label:idc=hk,role=")
    res = _zy(dup, "run", "-t", "label:role=", "--", "true")
    assert res.returncode == 2 and "has an empty value" in res.stderr, res
    # the master refuses it too, for clients that do not use the SDK
    from hcsdk._portal import portal

    with pytest.raises(TargetError, match="has an empty value"):
        portal().call(lambda: dup.client._async._link.request("GET", "/api/v1/inventory",
                                                         params={"targets": "label:role="}))
    # a key alone still means "has this label", as the README says
    assert len(dup.client.inventory("label:role")) == 3
    assert len(dup.client.inventory("label:tier")) == 1


# -- a master restarted on port 0 ------------------------------------------------------------------
def test_master_restarted_on_port_0_keeps_its_port_and_agents_reconnect(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.start_master()  # --listen 127.0.0.1:0
    try:
        fleet.start_agent("keeper-1")
        fleet.wait_online()
        first = fleet.port
        assert (tmp_path / "master" / "listen.port").read_text().strip() == str(first)
        assert fleet.master is not None
        fleet.master.stop()
        fleet.start_master(0)  # the same data dir, port 0 again: it must not strand the agent
        assert fleet.port == first
        fleet.client.close()  # its connections went with the old master
        fleet._client = None
        fleet.wait_online("keeper-1", timeout=40)
        df = fleet.client.run("echo back", targets="keeper-1", timeout=30).to_dataframe()
        assert df.loc[0, "stdout"] == "back\n"
    finally:
        fleet.close()


def test_master_refuses_port_0_when_its_old_port_is_taken(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.start_master()
    try:
        port = fleet.port
        assert fleet.master is not None
        fleet.master.stop()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            res = subprocess.run([*ZY, "master", "--data-dir", str(tmp_path / "master"), "--listen", "127.0.0.1:0",
                                  "--no-user-config"], capture_output=True, text=True, env=fleet.env, timeout=60)
        assert res.returncode == 2, res
        assert f"listened on port {port} before and its agents dial that port" in res.stderr, res.stderr
        assert "--listen 127.0.0.1:NEWPORT" in res.stderr
    finally:
        fleet.close()


# -- the README, as written -----------------------------------------------------------------------
def _block(title: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {lang} block after {title!r}"
    return match.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_readme_five_minutes_and_python_work_as_written(tmp_path: Path) -> None:
    """Each line of "Five minutes" in a shell, in order, at a person's pace (the next line once
    the last one's effect is there), then the "From Python" block."""
    lines = [re.split(r"\s{2,}#", line)[0].strip() for line in _block("## Five minutes", "bash").splitlines()]
    lines = [line for line in lines if line]
    assert lines[0] == ". .venv/bin/activate"
    lines[0] = f". {VENV_BIN}/activate"  # the checkout's venv; the commands run in a scratch dir
    port = _free_port()
    lines = [line.replace("127.0.0.1:8443", f"127.0.0.1:{port}") for line in lines]
    online = ("for i in $(seq 150); do zy inventory | grep -q '1 agent, 1 online' && break; sleep 0.2; done; "
              "zy inventory | grep -q '1 agent, 1 online'")
    script = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for line in lines:
        script.append(f"echo '+ {line}'")
        script.append(line)
        if line.startswith("zy master"):
            script.append("for i in $(seq 150); do [ -s state/master/client.toml ] && break; sleep 0.2; done")
        elif line.startswith(("zy agent", "kill %2")):
            script.append(online)
    script.append("zy inventory --wide")
    script.append(f"python - <<'EOF'\n{_block('From Python:', 'python')}\nprint('python-block-done')\nEOF")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZY_") and k != "VIRTUAL_ENV"}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), COLUMNS="80",
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(VENV_BIN)))
    proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "ok: 1" in out and "python-block-done" in out, out
    assert "start None" not in out and " None" not in out.split("python - <<")[-1], out
    assert re.search(r"\S+ done: ok 0", out), out
    assert re.search(r"\S+ stdout '[^']*hi\\n'", out), out
    # the restarted agent came back as the same uuid: still one agent
    assert out.count("1 agent, 1 online") >= 2, out


# -- setup.sh -------------------------------------------------------------------------------------
def test_setup_waits_for_a_held_dpkg_lock_then_says_plainly_what_failed() -> None:
    """Another apt holds dpkg's lock the whole time: setup says it waits, waits APT_WAIT
    seconds, then stops with one plain sentence (not apt's raw 'E: Could not get lock')."""
    require(os.geteuid() == 0 and Path("/var/lib/dpkg/lock-frontend").exists(),
            "needs root and dpkg (setup.sh installs apt packages only as root)")
    fd = os.open("/var/lib/dpkg/lock-frontend", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.monotonic()
        res = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "ZY_SETUP_APT_PACKAGES": "zy-no-such-package",
                                               "APT_WAIT": "4"})
        waited = time.monotonic() - started
    finally:
        os.close(fd)
    assert res.returncode == 1, res
    assert "another apt or dpkg is running (it holds /var/lib/dpkg/lock-frontend); waiting up to 4s" in res.stderr
    assert ("FAILED: another apt or dpkg still holds /var/lib/dpkg/lock-frontend after 4s, so zy-no-such-package "
            "could not be installed") in res.stderr, res.stderr
    assert "Could not get lock" not in res.stderr and "E:" not in res.stderr
    assert waited >= 4  # it did wait (a lower bound: load only makes it longer)
    assert "setup: ready" not in res.stdout  # it stopped before touching the virtualenv


def test_an_editable_install_prints_no_deprecation_warnings(tmp_path: Path) -> None:
    """What setup.sh runs, on a copy of the project into a scratch venv (the shared venv is
    left alone): the license table used to cost 42 lines of deprecation warnings, the editable
    install's note 10 more."""
    copy = tmp_path / "hcsdk"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    for pkg in ("hcsdk", "master", "agent", "proxy", "kernel_ext"):
        shutil.copytree(ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    quiet = "ignore:Editable installation"
    assert f'PYTHONWARNINGS="${{PYTHONWARNINGS:+$PYTHONWARNINGS,}}{quiet}" pip_quiet -e' in setup
    # a scratch venv, filled by this venv's pip through --python: `pip install --prefix` would
    # uninstall the shared venv's own hcsdk first
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                          "--disable-pip-version-check", "--no-deps", "-e", str(copy)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": quiet}, timeout=300)
    output = [line for line in (res.stdout + res.stderr).splitlines() if "is ignored" not in line]
    assert res.returncode == 0, "\n".join(output)
    assert output == [], "\n".join(output)
