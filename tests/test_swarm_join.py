"""`zy swarm` takes its join token as `zy agent` does (issue 13, hole 2): from --join-file or
ZY_JOIN_TOKEN, --join with a warning, and once its agents are enrolled the token is in neither
its /proc/PID/cmdline (world-readable) nor its /proc/PID/environ: the kernel keeps what a
process was started with for its whole life, so only a re-exec without it sheds it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fleet import ZY, Fleet, Proc, wait_for
from hcsdk import JoinToken


def _proc_text(pid: int, what: str) -> bytes:
    return Path(f"/proc/{pid}/{what}").read_bytes()


def _assert_clean(pid: int, token: str) -> None:
    secrets = [token.encode(), JoinToken.decode(token).secret.encode()]
    for what in ("cmdline", "environ"):
        assert not any(s in _proc_text(pid, what) for s in secrets), f"/proc/{pid}/{what} holds the join token"
    assert b"ZY_JOIN_TOKEN" not in _proc_text(pid, "environ")


def _swarm(fleet: Fleet, name: str, join: list[str], env: dict[str, str] | None = None) -> Proc:
    argv = [*ZY, "swarm", "--agents", "3", "--state-dir", str(fleet.root / "swarms" / name), "--name", name,
            "--status-every", "1", *join]
    proc = Proc(name, argv, fleet.root / f"swarm-{name}.log", {**fleet.env, **(env or {})})
    fleet.agents[name] = proc
    return proc


def _running(fleet: Fleet, proc: Proc, name: str) -> None:
    """Its 3 agents online, and the process past enrollment (and past its re-exec, if any)."""
    wait_for(lambda: fleet.online_count(f"{name}-") == 3, 120, f"3 {name} agents online")
    wait_for(lambda: "(0 newly enrolled)" in proc.output() or "(3 newly enrolled)" in proc.output(), 30,
             f"{name} to run its agents")
    assert proc.alive, proc.output()


def test_a_swarm_takes_its_token_from_a_file_or_the_environment_and_keeps_it_out(fleet: Fleet) -> None:
    token = fleet.client.create_join_token(ttl=600)["token"]
    path = fleet.join_file(token)
    by_file = _swarm(fleet, "swf", ["--join-file", str(path)])
    by_env = _swarm(fleet, "swe", [], {"ZY_JOIN_TOKEN": token})
    _running(fleet, by_file, "swf")
    _running(fleet, by_env, "swe")
    _assert_clean(by_file.popen.pid, token)  # it never had it
    _assert_clean(by_env.popen.pid, token)  # re-executed (same pid) without it
    assert "restarting without the join token" in by_env.output()
    assert "restarting" not in by_file.output()  # a path is no secret: nothing to shed
    assert not any("warning: --join" in p.output() for p in (by_file, by_env))
    df = fleet.client.run("echo $ZY_JOIN_TOKEN.", targets="swe-00000", timeout=30).to_dataframe()
    assert list(df["stdout"]) == [".\n"], df  # nor do the commands its agents run get it


def test_a_swarm_given_join_warns_and_sheds_it_once_enrolled(fleet: Fleet) -> None:
    token = fleet.client.create_join_token(ttl=600)["token"]
    proc = _swarm(fleet, "swa", ["--join", token])
    _running(fleet, proc, "swa")
    out = proc.output()
    assert "zy swarm: warning: --join puts the join token in the process arguments" in out, out
    assert "3 agents enrolled (3 newly); restarting without the join token" in out, out
    _assert_clean(proc.popen.pid, token)
    proc.stop()
    again = _swarm(fleet, "swa", ["--join", token])  # a start script that still passes it: shed at once
    _running(fleet, again, "swa")
    assert "(0 newly); restarting without the join token" in again.output()
    assert "warning: --join" not in again.output()  # read only when an agent needs enrolling
    _assert_clean(again.popen.pid, token)


def test_a_swarm_token_file_that_cannot_be_used_is_a_clear_error(fleet: Fleet, tmp_path: Path) -> None:
    base = [*ZY, "swarm", "--agents", "2", "--state-dir", str(tmp_path / "s"), "--proxy", fleet.url]
    proc = subprocess.run([*base, "--join-file", str(tmp_path / "missing.token")], capture_output=True, text=True,
                          timeout=60, env=fleet.env)
    assert proc.returncode == 2
    assert f"zy swarm: cannot read the join token file {tmp_path / 'missing.token'}" in proc.stderr, proc.stderr
    proxy_token = fleet.proxy_token()
    proc = subprocess.run([*base, "--join-file", str(fleet.join_file(proxy_token))], capture_output=True, text=True,
                          timeout=60, env=fleet.env)
    assert proc.returncode == 2
    assert "zy swarm: this is a proxy token; swarm agents need one from `zy token create`" in proc.stderr
