"""A local fleet: a master and agents started as real `zy` subprocesses on loopback.

Used by the tests, the benchmarks and the quickstart. It only runs commands; it imports no
service code.

>>> fleet = LocalFleet(Path("/tmp/demo")); fleet.start_master()
>>> fleet.start_agent("web-1", {"role": "web"}); fleet.wait_online()
>>> fleet.client.run("uptime", targets="web-*").to_dataframe()
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._client import Client

ZY = [sys.executable, "-m", "hcsdk.cli"]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]):
        self.name = name
        self.argv = argv
        self.log = log
        self._offset = log.stat().st_size if log.exists() else 0
        self._fh = open(log, "ab")
        self.popen = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What this process wrote (a restarted process appends to the same log)."""
        with open(self.log, "rb") as fh:
            fh.seek(self._offset)
            return fh.read().decode(errors="replace")

    def kill(self) -> None:
        if self.alive:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._fh.close()

    def stop(self, timeout: float = 10) -> None:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._fh.close()


class LocalFleet:
    """A master and its agents, each a real process, in one temporary directory."""

    def __init__(self, root: Path, master_args: list[str] | None = None):
        self.root = root
        self.master_args = master_args or []
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(root / "xdg"), "PYTHONUNBUFFERED": "1"}
        for key in ("ZY_CONFIG", "ZY_MASTER", "ZY_TOKEN", "ZY_CA"):
            self.env.pop(key, None)
        self.master: Proc | None = None
        self.agents: dict[str, Proc] = {}
        self.url = ""
        self.port = 0
        self._client: Client | None = None
        self._token: str | None = None

    # -- master ------------------------------------------------------------------------------
    def start_master(self, port: int = 0, extra: list[str] | None = None) -> None:
        argv = [*ZY, "master", "--data-dir", str(self.root / "master"), "--listen", f"127.0.0.1:{port}",
                "--no-user-config", *self.master_args, *(extra or [])]
        master = self.master = Proc("master", argv, self.root / "master.log", self.env)

        def listening() -> re.Match[str] | None:
            if not master.alive:
                raise AssertionError("master exited:\n" + master.output())
            return re.search(r"listening on (https://\S+)", master.output())

        match = wait_for(listening, 30, "master to listen")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def restart_master(self, kill: bool = True) -> None:
        assert self.master is not None
        if kill:
            self.master.kill()
        self.master.stop()
        self.start_master(self.port)

    @property
    def config_path(self) -> Path:
        return self.root / "master" / "client.toml"

    @property
    def admin_token(self) -> str:
        import tomllib

        return str(tomllib.loads(self.config_path.read_text())["token"])

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, token=self.admin_token, ca=str(self.root / "master" / "ca.pem"))
        return self._client

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = self.client.create_join_token(ttl=3600)["token"]
        return self._token

    # -- agents ------------------------------------------------------------------------------
    def start_agent(self, name: str, labels: dict[str, str] | None = None, extra: list[str] | None = None,
                    join: bool = True, fast: bool = True) -> Proc:
        """Start an agent reporting ``name`` as its hostname. ``fast`` shortens heartbeats and
        reconnect waits so failures show within seconds (what tests want)."""
        state = self.root / "agents" / name
        quick = ["--heartbeat", "2", "--dead-after", "8", "--backoff-cap", "2", "--h2-retry", "2"] if fast else []
        argv = [*ZY, "agent", "--state-dir", str(state), "--hostname", name, *quick, *(extra or [])]
        if join and not (state / "identity.json").exists():
            argv += ["--join", self.token]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        proc = Proc(name, argv, self.root / f"agent-{name}.log", self.env)
        self.agents[name] = proc
        return proc

    def uuid_of(self, name: str) -> str:
        import json

        return str(json.loads((self.root / "agents" / name / "identity.json").read_text())["uuid"])

    def online(self) -> set[str]:
        inv = self.client.inventory()
        return set(inv.loc[inv["online"], "hostname"])

    def wait_online(self, *names: str, timeout: float = 30) -> None:
        wanted = set(names or self.agents)
        wait_for(lambda: wanted <= self.online(), timeout, f"agents {sorted(wanted)} online")

    def wait_offline(self, name: str, timeout: float = 30) -> None:
        wait_for(lambda: name not in self.online(), timeout, f"agent {name} offline")

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in self.agents.values():
            proc.stop(5)
        if self.master:
            self.master.stop()

    def logs(self) -> str:
        parts = []
        for proc in [self.master, *self.agents.values()]:
            if proc is not None:
                parts.append(f"===== {proc.name} =====\n{proc.output()[-4000:]}")
        return "\n".join(parts)
