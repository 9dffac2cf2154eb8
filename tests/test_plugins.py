"""Plugins online, on real agents: install, hot-load, isolation in the worker process, listing
and removal, and the SHA-256 check."""

from __future__ import annotations

import base64
import hashlib
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import Fleet, wait_for
from hcsdk import Client

V1 = '''
import os
import time

from agent.plugins.api import Arg, command

VERSION = "{version}"


@command("hello.greet", args={{"name": Arg(str, default="world")}})
def greet(ctx, name):
    """Greets."""
    ctx.out("hello " + name + " from {version}\\n")
    return {{"version": VERSION, "worker": os.getpid()}}


@command("hello.slow", args={{"seconds": Arg(float, min=0)}}, streams=True)
def slow(ctx, seconds):
    ctx.out("started on {version}\\n")
    ctx.sleep(seconds)
    ctx.out("finished on {version}\\n")
    return {{"version": VERSION}}
'''

TROUBLE = '''
import os
import signal
import time

from agent.plugins.api import Arg, command

VERSION = "1"


@command("trouble.crash")
def crash(ctx):
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(30)  # the signal may land on another thread a moment later: do not return first


@command("trouble.hang")
def hang(ctx):
    while True:  # ignores ctx.cancelled on purpose
        time.sleep(0.1)


@command("trouble.leak")
def leak(ctx):
    hoard = []
    while True:
        hoard.append(bytearray(16 * 1024 * 1024))
        time.sleep(0.05)


@command("trouble.raise")
def boom(ctx):
    return {"x": 1 / 0}


@command("trouble.nan")
def nan(ctx):
    return {"x": float("nan")}


@command("trouble.huge")
def huge(ctx):
    return {"x": "a" * 2_000_000}


@command("trouble.bigint")
def bigint(ctx):
    return {"x": 2**70}


@command("trouble.pid")
def pid(ctx):
    return {"worker": os.getpid()}
'''


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("plugins"), ["--offline-grace", "2", "--heartbeat", "2"])
    fleet.start_master()
    for name in ("p-1", "p-2"):
        fleet.start_agent(name, {"role": "plug"}, extra=["--worker-memory", "160"])
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def _plugin(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def _connects(client: Client) -> dict[str, int]:
    inv = client.inventory("label:role=plug")
    return dict(zip(inv["hostname"], inv["connects"], strict=True))


def test_install_then_hot_replace_while_a_task_runs(fl: Fleet, tmp_path: Path) -> None:
    client = fl.client
    before = _connects(client)
    df = client.plugins.install(_plugin(tmp_path, "hello", V1.format(version="1.0")), targets="label:role=plug")
    assert list(df["status"]) == ["ok", "ok"] and set(df["version"]) == {"1.0"}
    assert set(df.loc[0, "cmds"]) == {"hello.greet", "hello.slow"}
    out = client.run(cmd="hello.greet", args={"name": "ops"}, targets="p-1", timeout=30).to_dataframe()
    assert out.loc[0, "status"] == "ok" and out.loc[0, "stdout"] == "hello ops from 1.0\n"
    assert out.loc[0, "result"]["version"] == "1.0"

    slow = client.run(cmd="hello.slow", args={"seconds": 4}, targets="p-1", timeout=60)
    started = threading.Event()

    def watch() -> None:
        for event in slow.events():
            if event.kind == "stdout":
                started.set()

    threading.Thread(target=watch, daemon=True).start()
    assert started.wait(30)
    df = client.plugins.install(_plugin(tmp_path, "hello", V1.format(version="2.0")), targets="label:role=plug")
    assert set(df["version"]) == {"2.0"} and set(df["replaced"]) == {"1.0"}
    new = client.run(cmd="hello.greet", targets="p-1", timeout=30).to_dataframe()
    assert new.loc[0, "stdout"] == "hello world from 2.0\n"
    old = slow.to_dataframe()
    assert old.loc[0, "status"] == "ok"
    assert old.loc[0, "stdout"] == "started on 1.0\nfinished on 1.0\n"  # the old code to the end
    assert _connects(client) == before  # no agent reconnected


def test_bad_arguments_are_a_clear_error(fl: Fleet, tmp_path: Path) -> None:
    fl.client.plugins.install(_plugin(tmp_path, "hello", V1.format(version="1.0")), targets="p-2")
    df = fl.client.run(cmd="hello.slow", args={"seconds": "soon"}, targets="p-2", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "error" and df.loc[0, "error"] == "args.seconds must be a number (got 'soon')"
    df = fl.client.run(cmd="hello.greet", args={"nmae": "x"}, targets="p-2", timeout=30).to_dataframe()
    assert df.loc[0, "error"] == "unknown argument nmae (takes: name)"
    df = fl.client.run(cmd="echo", args={"txt": "x"}, targets="p-2", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "error" and df.loc[0, "error"] == "unknown argument txt (takes: text)"


def test_crash_hang_and_leak_take_down_only_the_worker(fl: Fleet, tmp_path: Path) -> None:
    client = fl.client
    assert set(client.plugins.install(_plugin(tmp_path, "trouble", TROUBLE), targets="p-2")["status"]) == {"ok"}
    before = _connects(client)

    def one(cmd: str, timeout: float = 30) -> dict[str, object]:
        df = client.run(cmd=cmd, args={}, targets="p-2", timeout=timeout).to_dataframe()
        return dict(df.loc[0])

    first = one("trouble.pid")["result"]
    crashed = one("trouble.crash")
    assert crashed["status"] == "error" and "the plugin worker died (SIGSEGV)" in str(crashed["error"])
    raised = one("trouble.raise")
    assert raised["status"] == "error" and str(raised["error"]).startswith("ZeroDivisionError: division by zero (")
    hung = one("trouble.hang", timeout=1)
    assert hung["status"] == "timeout"
    leaked = one("trouble.leak", timeout=60)
    assert leaked["status"] == "error" and "over its limit of 160 MiB" in str(leaked["error"])
    for cmd, reason in (("trouble.nan", "is not JSON: Out of range float values"),
                        ("trouble.huge", "bytes of result; at most 1048576"),
                        ("trouble.bigint", "an integer beyond 64 bits")):
        bad = one(cmd)
        assert bad["status"] == "error" and reason in str(bad["error"]), bad["error"]
    after = one("trouble.pid")
    assert after["status"] == "ok" and after["result"] != first  # a new worker serves on
    assert one("echo")["status"] == "ok"
    assert _connects(client) == before


def test_a_bundle_that_does_not_match_its_hash_is_refused(fl: Fleet) -> None:
    data = b"from agent.plugins.api import command\n@command('evil.x')\ndef x(ctx):\n    return None\n"
    args = {"name": "evil", "kind": "py", "sha256": hashlib.sha256(b"something else").hexdigest(),
            "data": base64.b64encode(data).decode()}
    df = fl.client.run(cmd="zy.plugin.install", args=args, targets="p-1", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "error" and "the signed command says" in df.loc[0, "error"]
    df = fl.client.run(cmd="evil.x", args={}, targets="p-1", timeout=30).to_dataframe()
    assert "unknown cmd 'evil.x'" in df.loc[0, "error"]


def test_a_plugin_that_does_not_load_leaves_the_old_version_serving(fl: Fleet, tmp_path: Path) -> None:
    client = fl.client
    client.plugins.install(_plugin(tmp_path, "hello", V1.format(version="3.0")), targets="p-1")
    df = client.plugins.install(_plugin(tmp_path, "hello", "import no_such_module_anywhere\n"), targets="p-1")
    assert df.loc[0, "status"] == "error"
    assert "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in df.loc[0, "error"]
    out = client.run(cmd="hello.greet", targets="p-1", timeout=30).to_dataframe()
    assert out.loc[0, "stdout"] == "hello world from 3.0\n"
    taken = _plugin(tmp_path, "thief", "from agent.plugins.api import command\n"
                                       "@command('shell')\ndef s(ctx):\n    pass\n")
    df = client.plugins.install(taken, targets="p-1")
    assert "cmd 'shell' is built into the agent" in df.loc[0, "error"]


def test_list_and_remove(fl: Fleet, tmp_path: Path) -> None:
    client = fl.client
    client.plugins.install(_plugin(tmp_path, "hello", V1.format(version="4.0")), targets="label:role=plug")
    listing = client.plugins.list("label:role=plug")
    assert set(listing["hostname"]) == {"p-1", "p-2"}
    hello = listing[listing["plugin"] == "hello"]
    assert list(hello["version"]) == ["4.0", "4.0"] and set(hello["source"]) == {"installed"}
    builtin = listing[listing["plugin"] == "builtin"].iloc[0]
    assert {"shell", "exec", "ping", "facts", "echo"} <= set(builtin["cmds"])
    assert {"file", "log", "java", "tomcat"} <= set(listing[listing["source"] == "bundled"]["plugin"])

    df = client.plugins.remove("hello", targets="p-1")
    assert df.loc[0, "status"] == "ok" and df.loc[0, "version"] == "4.0"
    gone = client.run(cmd="hello.greet", targets="p-1", timeout=30).to_dataframe()
    assert "unknown cmd 'hello.greet'" in gone.loc[0, "error"]
    again = client.plugins.remove("hello", targets="p-1")
    assert "no installed plugin 'hello'" in again.loc[0, "error"]
    still = client.run(cmd="hello.greet", targets="p-2", timeout=30).to_dataframe()
    assert still.loc[0, "status"] == "ok"


def test_installed_plugins_survive_an_agent_restart(fl: Fleet, tmp_path: Path) -> None:
    client = fl.client
    client.plugins.install(_plugin(tmp_path, "hello", V1.format(version="5.0")), targets="p-2")
    fl.agents["p-2"].stop()
    fl.start_agent("p-2", {"role": "plug"}, extra=["--worker-memory", "160"])
    fl.wait_online("p-2")
    def greeting() -> str | None:
        df = client.run(cmd="hello.greet", targets="p-2", timeout=30).to_dataframe()
        return str(df.loc[0, "stdout"]) if df.loc[0, "status"] == "ok" else None

    assert wait_for(greeting, what="the restarted agent serving hello.greet") == "hello world from 5.0\n"


def test_the_readme_plugin_example_installs_and_runs(fl: Fleet, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    source = readme.split("```python\n# diskfree.py\n", 1)[1].split("```", 1)[0]
    df = fl.client.plugins.install(_plugin(tmp_path, "diskfree", source), targets="p-1")
    assert df.loc[0, "status"] == "ok" and df.loc[0, "cmds"] == ["disk.free"]
    out = fl.client.run(cmd="disk.free", args={"path": str(tmp_path)}, targets="p-1", timeout=30).to_dataframe()
    assert out.loc[0, "status"] == "ok" and out.loc[0, "stdout"].startswith(f"{tmp_path}: ")
    assert set(out.loc[0, "result"]) == {"free_gib", "used_pct"}
    bad = fl.client.run(cmd="disk.free", args={"min_gib": -1}, targets="p-1", timeout=30).to_dataframe()
    assert bad.loc[0, "error"] == "args.min_gib must be at least 0 (got -1)"
    huge = fl.client.run(cmd="disk.free", args={"min_gib": 1e9}, targets="p-1", timeout=30).to_dataframe()
    assert huge.loc[0, "status"] == "error" and "GiB free on /" in huge.loc[0, "error"]


def test_bundled_plugins_run_in_the_worker(fl: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "motd"
    path.write_text("welcome\n")
    client = fl.client
    out = client.run(cmd="file.read", args={"path": str(path)}, targets="p-2", timeout=30).to_dataframe()
    assert out.loc[0, "status"] == "ok" and out.loc[0, "stdout"] == "welcome\n"
    assert out.loc[0, "result"]["size"] == 8
    target = tmp_path / "written"
    out = client.run(cmd="file.write", args={"path": str(target), "content": "x=1\n"}, targets="p-2",
                     timeout=30).to_dataframe()
    assert out.loc[0, "status"] == "ok" and target.read_text() == "x=1\n"
    out = client.run(cmd="file.read", args={"path": "/proc/self/environ"}, targets="p-2", timeout=30).to_dataframe()
    assert out.loc[0, "status"] == "error" and "is not allowed" in out.loc[0, "error"]
