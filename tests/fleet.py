"""Tests use the library's local fleet; this keeps their imports short.

``Fleet(root, args)`` is ``hcsdk.localfleet.LocalFleet`` (one master on SQLite, as every test
had it). ``Fleet(root, args, store=pg_url)`` runs every master on that PostgreSQL store, sharing
one key file, and ``start_master(name="b")`` adds another master with its own data dir, port and
client (``fleet.masters["b"]``); the first master (``name="a"``) is the one ``fleet.url``,
``fleet.client`` and ``fleet.master`` name, as before. Agents and swarms can be started against a
chosen master (``master="b"``: that master's join token, whose URLs list it first).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from hcsdk._client import Client
from hcsdk.localfleet import ZY, LocalFleet, Proc, wait_for

__all__ = ["ZY", "Fleet", "LocalFleet", "Member", "Proc", "wait_for"]

#: the name of the first master (the one LocalFleet's own attributes describe)
FIRST = "a"


@dataclass
class Member:
    """One master of a fleet: its process, data dir, URL and (lazily) an SDK client."""

    name: str
    data_dir: Path
    proc: Proc
    port: int
    host: str = "127.0.0.1"
    _client: Client | None = field(default=None, repr=False)
    _token: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "client.toml"

    @property
    def admin_token(self) -> str:
        import tomllib

        return str(tomllib.loads(self.config_path.read_text())["token"])

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, token=self.admin_token, ca=str(self.data_dir / "ca.pem"))
        return self._client

    @property
    def token(self) -> str:
        """A join token made by this master (its URLs first, then the other live masters')."""
        if self._token is None:
            self._token = self.client.create_join_token(ttl=3600)["token"]
        return self._token

    @property
    def master_id(self) -> str:
        return (self.data_dir / "master.id").read_text().strip()

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class Fleet(LocalFleet):
    def __init__(self, root: Path, master_args: list[str] | None = None, store: str | None = None) -> None:
        super().__init__(root, master_args)
        #: the PostgreSQL URL every master of this fleet keeps its state in (None: SQLite, one master)
        self.store = store
        self.masters: dict[str, Member] = {}

    @property
    def key_file(self) -> Path:
        return self.root / "cluster.key"

    def _store_args(self) -> list[str]:
        return ["--store", self.store, "--key-file", str(self.key_file)] if self.store else []

    # -- masters -----------------------------------------------------------------------------
    def start_master(self, port: int = 0, extra: list[str] | None = None, host: str = "127.0.0.1",
                     name: str = FIRST) -> None:
        if name == FIRST:
            super().start_master(port, [*self._store_args(), *(extra or [])], host)
            assert self.master is not None
            old = self.masters.get(FIRST)
            if old is not None:
                old.close_client()
            self.masters[FIRST] = Member(FIRST, self.root / "master", self.master, self.port, host)
            return
        self._start_member(name, port, extra, host)

    def _start_member(self, name: str, port: int, extra: list[str] | None, host: str) -> Member:
        data_dir = self.root / f"master-{name}"
        argv = [*ZY, "master", "--data-dir", str(data_dir), "--listen", f"{host}:{port}", "--no-user-config",
                *self._store_args(), *self.master_args, *(extra or [])]
        proc = Proc(f"master-{name}", argv, self.root / f"master-{name}.log", self.env)

        def listening() -> re.Match[str] | None:
            if not proc.alive:
                raise AssertionError(f"master {name} exited:\n" + proc.output())
            return re.search(r"listening on (https://\S+)", proc.output())

        match = wait_for(listening, 30, f"master {name} to listen")
        old = self.masters.get(name)
        if old is not None:
            old.close_client()
        member = self.masters[name] = Member(name, data_dir, proc, int(match.group(1).rsplit(":", 1)[1]), host)
        return member

    def kill_master(self, name: str = FIRST) -> None:
        """SIGKILL one master (no goodbye to the cluster: the others must find out)."""
        self.masters[name].proc.kill()

    def stop_master(self, name: str = FIRST) -> None:
        self.masters[name].proc.stop()

    def restart_master(self, kill: bool = True, name: str = FIRST) -> None:
        member = self.masters[name]
        if kill:
            member.proc.kill()
        member.proc.stop()
        self.start_master(member.port, host=member.host, name=name)

    # -- agents ------------------------------------------------------------------------------
    def start_agent(self, name: str, labels: dict[str, str] | None = None, extra: list[str] | None = None,
                    join: bool = True, fast: bool = True, wrap: list[str] | None = None,
                    master: str | None = None) -> Proc:
        """As LocalFleet's; ``master`` pins it to one master (that master's join token, and its URL
        the only one the agent dials: agents otherwise start at a random URL of the token's)."""
        if master is None:
            return super().start_agent(name, labels, extra, join, fast, wrap)
        member = self.masters[master]
        state = self.root / "agents" / name
        quick = ["--heartbeat", "2", "--dead-after", "8", "--backoff-cap", "2", "--h2-retry", "2"] if fast else []
        argv = [*ZY, "agent", "--state-dir", str(state), "--hostname", name, *quick, "--master", member.url,
                *(extra or [])]
        if join and not (state / "identity.json").exists():
            argv += ["--join-file", str(self.join_file(member.token))]
        for key, value in (labels or {}).items():
            argv += ["--label", f"{key}={value}"]
        proc = Proc(name, [*(wrap or []), *argv], self.root / f"agent-{name}.log", self.env)
        self.agents[name] = proc
        return proc

    def start_swarm(self, count: int, name: str = "swarm", urls: list[str] | None = None,
                    extra: list[str] | None = None, wrap: list[str] | None = None,
                    master: str | None = None) -> Proc:
        """As LocalFleet's; ``master`` names the master whose join token the swarm enrolls with
        (its URLs: that master's first, then the other live masters'; each agent starts at a random one)."""
        if master is None:
            return super().start_swarm(count, name, urls, extra, wrap)
        token = self.masters[master].token
        argv = [*(wrap or []), *ZY, "swarm", "--join-file", str(self.join_file(token)), "--agents", str(count),
                "--state-dir", str(self.root / "swarms" / name), "--name", name, "--status-every", "2",
                *[arg for url in urls or [] for arg in ("--proxy", url)], *(extra or [])]
        proc = Proc(name, argv, self.root / f"swarm-{name}.log", self.env)
        self.agents[name] = proc
        return proc

    # -- the cluster -------------------------------------------------------------------------
    def cluster(self) -> list[dict[str, object]]:
        """`zy master cluster --store URL --json`: the registry as the store has it."""
        import subprocess

        args = ["--store", self.store] if self.store else ["--data-dir", str(self.root / "master")]
        done = subprocess.run([*ZY, "master", "cluster", *args, "--json"], capture_output=True, text=True,
                              env=self.env, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, object]] = json.loads(done.stdout)
        return rows

    def singleton(self) -> str | None:
        """The name of the master holding the singleton lease, per `zy master cluster`."""
        by_id = {m.master_id: n for n, m in self.masters.items() if (m.data_dir / "master.id").exists()}
        for row in self.cluster():
            if row["singleton"] and row["alive"]:
                return by_id.get(str(row["id"]), str(row["id"]))
        return None

    def wait_singleton(self, name: str, timeout: float = 60) -> None:
        wait_for(lambda: self.singleton() == name, timeout, f"master {name} to hold the singleton lease")

    # -- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        for member in self.masters.values():
            member.close_client()
        super().close()
        for name, member in self.masters.items():
            if name != FIRST:
                member.proc.stop()

    def logs(self) -> str:
        parts = [super().logs()]
        for name, member in self.masters.items():
            if name != FIRST:
                parts.append(f"===== master {name} =====\n{member.proc.output()[-4000:]}")
        return "\n".join(parts)
