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

from hcsdk._client import Client

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

    def detach(self) -> None:
        """Hand the running process over: close our end of its log, and tell Popen it is not
        ours to wait for (it must not warn when this object goes away)."""
        self._fh.close()
        self.popen.returncode = 0


class LocalFleet:
    """A master and its agents, each a real process, in one temporary directory."""

    def __init__(self, root: Path, master_args: list[str] | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
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
        self._master_host = "127.0.0.1"

    # -- master ------------------------------------------------------------------------------
    def start_master(self, port: int = 0, extra: list[str] | None = None, host: str = "127.0.0.1") -> None:
        self._master_host = host
        argv = [*ZY, "master", "--data-dir", str(self.root / "master"), "--listen", f"{host}:{port}",
                "--no-user-config", *self.master_args, *(extra or [])]
        master = self.master = Proc("master", argv, self.root / "master.log", self.env)

        def listening() -> re.Match[str] | None:
            if not master.alive:
                raise AssertionError("master exited:\n" + master.output())
            return re.search(r"listening on (https://\S+)", master.output())

        match = wait_for(listening, 30, "master to listen")
        self.port = int(match.group(1).rsplit(":", 1)[1])
        self.url = f"https://127.0.0.1:{self.port}"  # the SDK talks over loopback

    def restart_master(self, kill: bool = True) -> None:
        assert self.master is not None
        if kill:
            self.master.kill()
        self.master.stop()
        self.start_master(self.port, host=self._master_host)

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

    def join_file(self, token: str) -> Path:
        """``token`` in a file of its own (0600), for ``--join-file``: a token on a command line
        is readable by every user of the host."""
        import hashlib

        path = self.root / "tokens" / f"{hashlib.sha256(token.encode()).hexdigest()[:16]}.token"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
        return path

    def proxy_token(self, host: str = "127.0.0.1") -> str:
        """A single-use proxy token for a proxy serving ``host`` (and loopback)."""
        names = [host] if host not in ("0.0.0.0", "::") else []
        names = list(dict.fromkeys([*names, "127.0.0.1", "localhost", "::1"]))
        return str(self.client.create_join_token(ttl=3600, kind="proxy", proxy_names=names, uses=1)["token"])

    # -- agents ------------------------------------------------------------------------------
    def start_agent(self, name: str, labels: dict[str, str] | None = None, extra: list[str] | None = None,
                    join: bool = True, fast: bool = True, wrap: list[str] | None = None) -> Proc:
        """Start an agent reporting ``name`` as its hostname. ``fast`` shortens heartbeats and
        reconnect waits so failures show within seconds (what tests want)."""
        state = self.root / "agents" / name
        quick = ["--heartbeat", "2", "--dead-after", "8", "--backoff-cap", "2", "--h2-retry", "2"] if fast else []
        argv = [*ZY, "agent", "--state-dir", str(state), "--hostname", name, *quick, *(extra or [])]
        if join and not (state / "identity.json").exists():
            argv += ["--join-file", str(self.join_file(self.token))]
        elif self.url and "--master" not in (extra or []):
            argv += ["--master", self.url]  # the master may have come back on another port
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        proc = Proc(name, [*(wrap or []), *argv], self.root / f"agent-{name}.log", self.env)
        self.agents[name] = proc
        return proc

    def start_proxy(self, name: str, upstreams: list[str] | None = None, extra: list[str] | None = None,
                    port: int = 0, host: str = "127.0.0.1", wrap: list[str] | None = None) -> str:
        """Start a proxy reporting ``name``; returns the URL agents (or other proxies) use.
        ``wrap`` prefixes the command (``ip netns exec NS`` puts it on a test host)."""
        state = self.root / "proxies" / name
        argv = [*(wrap or []), *ZY, "proxy", "--data-dir", str(state), "--hostname", name,
                "--listen", f"{host}:{port}",
                "--heartbeat", "2", "--dead-after", "8", "--backoff-cap", "2", *(extra or [])]
        if not (state / "identity.json").exists():
            argv += ["--join-file", str(self.join_file(self.proxy_token(host)))]
        for url in upstreams or [self.url]:
            argv += ["--upstream", url]
        proc = Proc(name, argv, self.root / f"proxy-{name}.log", self.env)
        self.agents[name] = proc

        def listening() -> re.Match[str] | None:
            if not proc.alive:
                raise AssertionError(f"proxy {name} exited:\n" + proc.output())
            return re.search(r"listening on (https://\S+)", proc.output())

        url = wait_for(listening, 30, f"proxy {name} to listen").group(1)
        return str(url).replace("127.0.0.1", host) if host not in ("127.0.0.1", "0.0.0.0") else str(url)

    def start_swarm(self, count: int, name: str = "swarm", urls: list[str] | None = None,
                    extra: list[str] | None = None, wrap: list[str] | None = None) -> Proc:
        """Start ``zy swarm``: ``count`` agents in one process, reporting NAME-00000, ...
        Its identities stay under the fleet root, so a restarted swarm reconnects the same agents."""
        argv = [*(wrap or []), *ZY, "swarm", "--join-file", str(self.join_file(self.token)), "--agents", str(count),
                "--state-dir", str(self.root / "swarms" / name), "--name", name, "--status-every", "2",
                *[arg for url in urls or [] for arg in ("--proxy", url)], *(extra or [])]
        proc = Proc(name, argv, self.root / f"swarm-{name}.log", self.env)
        self.agents[name] = proc
        return proc

    def online_count(self, prefix: str = "") -> int:
        inv = self.client.inventory()
        return int((inv["online"] & inv["hostname"].str.startswith(prefix)).sum())

    def uuid_of(self, name: str) -> str:
        import json

        return str(json.loads((self.root / "agents" / name / "identity.json").read_text())["uuid"])

    def online(self) -> set[str]:
        inv = self.client.inventory()
        return set(inv.loc[inv["online"], "hostname"])

    def wait_online(self, *names: str, timeout: float = 30) -> None:
        wanted = set(names or self.agents)
        try:
            wait_for(lambda: wanted <= self.online(), timeout, f"agents {sorted(wanted)} online")
        except AssertionError as exc:
            dead = [n for n in sorted(wanted) if n in self.agents and not self.agents[n].alive]
            tails = "".join(f"\n--- {n} exited:\n{self.agents[n].output()[-1500:]}" for n in dead)
            raise AssertionError(f"{exc}{tails}") from None

    def wait_offline(self, name: str, timeout: float = 30) -> None:
        wait_for(lambda: name not in self.online(), timeout, f"agent {name} offline")

    def detach(self) -> None:
        """Leave the processes running when this object goes away (see ``fleet_up``)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        for proc in [self.master, *self.agents.values()]:
            if proc is not None:
                proc.detach()
        self.master = None
        self.agents = {}

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


# -- a fleet that outlives the command that started it (`zy fleet up/down`) -------------------

DEFAULT_AGENTS: list[tuple[str, dict[str, str]]] = [
    ("web-1", {"role": "web", "idc": "hk"}),
    ("web-2", {"role": "web", "idc": "hk"}),
    ("web-3", {"role": "web", "idc": "sg"}),
    ("db-1", {"role": "db", "idc": "hk"}),
]


def _state_file(root: Path) -> Path:
    return root / "fleet.json"


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def fleet_status(root: Path) -> dict[str, Any] | None:
    """The running fleet under ``root`` (its URL, config path, pids), or None."""
    import json

    path = _state_file(root)
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    state["alive"] = {name: pid_alive(pid) for name, pid in state["pids"].items()}
    return state if state["alive"].get("master") else None


def fleet_up(root: Path, agents: list[tuple[str, dict[str, str]]] | None = None, port: int = 0,
             master_args: list[str] | None = None) -> dict[str, Any]:
    """Start a master and agents as background processes that keep running after this returns.

    Idempotent: a fleet already running under ``root`` is returned as it is."""
    import json

    root = root.resolve()
    running = fleet_status(root)
    if running:
        return running
    root.mkdir(parents=True, exist_ok=True)
    fleet = LocalFleet(root, master_args)
    try:
        fleet.start_master(port)
        for name, labels in agents or DEFAULT_AGENTS:
            fleet.start_agent(name, labels, fast=False)
        fleet.wait_online(timeout=60)
    except BaseException:
        fleet.close()
        raise
    pids = {"master": fleet.master.popen.pid} if fleet.master else {}
    pids.update({name: proc.popen.pid for name, proc in fleet.agents.items()})
    state = {"url": fleet.url, "config": str(fleet.config_path), "root": str(root), "pids": pids}
    _state_file(root).write_text(json.dumps(state, indent=1))
    fleet.detach()
    return fleet_status(root) or state


def fleet_down(root: Path, timeout: float = 10.0) -> list[str]:
    """Stop every process of the fleet under ``root``; returns the names that were running."""
    import json

    path = _state_file(root.resolve())
    if not path.exists():
        return []
    pids: dict[str, int] = json.loads(path.read_text())["pids"]
    stopped = [name for name, pid in pids.items() if pid_alive(pid)]
    # agents first, so none of them logs a lost master on the way out
    order = sorted(pids.items(), key=lambda kv: kv[0] == "master")
    for _, pid in order:
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    for pid in pids.values():
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    path.unlink()
    return stopped
