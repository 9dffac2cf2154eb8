"""Issue 13, holes 1 and 2: what a join token buys, and where it is visible.

Hole 1: a join token bought a certificate from the master's CA for any name, and the SDK trusts
that CA: a token holder could impersonate the master and read the admin token. Now the admin
binds a token's kind (and a proxy token's host names), proxies' certificates come from a proxy CA
the SDK never trusts, and a token can be limited to N enrollments.

Hole 2: the token sat in agents' and proxies' process arguments, survived the re-exec after
enrollment and was copied into new builds. Now it comes from --join-file or ZY_JOIN_TOKEN and is
never passed on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet import ZY, Fleet, Proc, wait_for
from hcsdk import Client
from hcsdk.common.errors import MasterUnreachable
from hcsdk.common.jointoken import JoinToken
from hcsdk.net.tls import client_context, issue_server_cert, make_csr
from hcsdk.protocol.e2e import b64, new_keypair

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("trust"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    try:
        yield fleet
    finally:
        fleet.close()


def _raw(fl: Fleet) -> httpx.Client:
    """A plain HTTPS client to the master (what a token holder writes, not the agent's code)."""
    return httpx.Client(base_url=fl.url, verify=client_context((fl.root / "master" / "ca.pem").read_bytes()),
                        timeout=30)


def _enroll(raw: httpx.Client, token: str, kind: str, names: list[str] | None = None,
            uuid: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"token": JoinToken.decode(token).credential, "uuid": uuid or str(uuidlib.uuid4()),
                            "facts": {"hostname": f"raw-{time.time_ns()}"}, "kind": kind,
                            "e2e_pub": b64(new_keypair()[1])}
    if names is not None:
        body["csr"] = make_csr(names)[0].decode()
    return raw.post("/v1/enroll", json=body)


def _zy(fl: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZY, *args], capture_output=True, text=True, timeout=60,
                          env={**fl.env, "ZY_CONFIG": str(fl.config_path)})


def _proxy_token(fl: Fleet, *names: str, uses: int = 0) -> str:
    return str(fl.client.create_join_token(ttl=600, kind="proxy", proxy_names=list(names), uses=uses)["token"])


# -- hole 1: what a token buys ---------------------------------------------------------------------

@pytest.mark.parametrize("names", [[socket.gethostname()], ["localhost"], ["127.0.0.1", "localhost"]])
def test_an_agent_token_cannot_buy_a_certificate(fl: Fleet, names: list[str]) -> None:
    """The attack: an agent token holder enrolls as kind 'proxy' with a CSR for the master's
    names. The token's kind is the admin's, so the master signs nothing."""
    with _raw(fl) as raw:
        resp = _enroll(raw, fl.token, "proxy", names)
    assert resp.status_code == 403, resp.text
    assert "is an agent token; it cannot enroll a proxy" in resp.json()["error"] and "cert" not in resp.json()


def test_a_proxy_token_signs_only_its_own_names(fl: Fleet) -> None:
    token = _proxy_token(fl, "p1.example")
    with _raw(fl) as raw:
        for names in (["evil.example"], ["p1.example", "localhost"], ["p1.example", socket.gethostname()]):
            resp = _enroll(raw, token, "proxy", names)
            assert resp.status_code == 400, resp.text
            assert "which this token does not allow (allowed: p1.example)" in resp.json()["error"]
        resp = _enroll(raw, token, "agent")  # nor can it enroll an agent
        assert resp.status_code == 403 and "is a proxy token; it cannot enroll an agent" in resp.json()["error"]
        resp = _enroll(raw, token, "proxy", ["p1.example"])
    assert resp.status_code == 200, resp.text
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(resp.json()["cert"].encode())
    master_ca = x509.load_pem_x509_certificate((fl.root / "master" / "ca.pem").read_bytes())
    proxy_ca = x509.load_pem_x509_certificate((fl.root / "master" / "proxy-ca.pem").read_bytes())
    assert cert.issuer == proxy_ca.subject != master_ca.subject
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["p1.example"]


def test_a_proxy_token_cannot_name_the_master(fl: Fleet) -> None:
    for names, why in (([socket.gethostname()], "one of this master's own names"), (["*.example"], "no wildcards")):
        proc = _zy(fl, "token", "create", "--kind", "proxy", *[a for n in names for a in ("--proxy-name", n)])
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr
    proc = _zy(fl, "token", "create", "--kind", "proxy")
    assert proc.returncode == 2 and "needs --proxy-name" in proc.stderr
    proc = _zy(fl, "token", "create", "--proxy-name", "p.example")
    assert proc.returncode == 2 and "--proxy-name is for --kind proxy" in proc.stderr


class _FakeMaster:
    """A TLS server on loopback that records what a client sends after the handshake: the
    reviewer's impersonated master."""

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = b""
        self.handshake_errors: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(10)
                    self.received += tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
                                b"connection: close\r\n\r\n[]")
            except (OSError, ssl.SSLError) as exc:
                self.handshake_errors.append(str(exc))

    def close(self) -> None:
        self.sock.close()


def test_a_proxy_certificate_cannot_impersonate_the_master_to_the_sdk(fl: Fleet, tmp_path: Path) -> None:
    """A real proxy, legitimately enrolled for 127.0.0.1: agents accept it; its certificate and
    key, used by a fake master on the same address, get no admin token out of the SDK."""
    edge = fl.start_proxy("edge")
    fl.start_agent("behind-1", extra=["--master", edge])
    fl.wait_online("behind-1", "edge")
    df = fl.client.run("echo via proxy", targets="behind-1", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "via proxy\n"

    import tomllib

    config = tomllib.loads(fl.config_path.read_text())
    state = fl.root / "proxies" / "edge"
    fake = _FakeMaster(state / "tls.pem", state / "tls.key")
    try:
        sdk = Client(fake.url, token=config["token"], ca=config["ca"])
        with pytest.raises(MasterUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            sdk.inventory()
        assert config["token"].encode() not in fake.received and fake.received == b""
    finally:
        fake.close()

    # The same fake master with a certificate from the master CA (what a proxy got before the
    # fix) does get the admin token: the harness above would catch the attack.
    master = fl.root / "master"
    cert, key = issue_server_cert((master / "ca.pem").read_bytes(), (master / "ca.key").read_bytes(),
                                  ["127.0.0.1"])
    (tmp_path / "old.pem").write_bytes(cert)
    (tmp_path / "old.key").write_bytes(key)
    fake = _FakeMaster(tmp_path / "old.pem", tmp_path / "old.key")
    try:
        with contextlib.suppress(Exception):
            Client(fake.url, token=config["token"], ca=config["ca"]).inventory()
        assert config["token"].encode() in fake.received
    finally:
        fake.close()


def test_a_single_use_token_enrolls_exactly_once(fl: Fleet) -> None:
    proc = _zy(fl, "token", "create", "--uses", "1", "--description", "once")
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    token_id = JoinToken.decode(token).token_id
    results: list[int] = []
    barrier = threading.Barrier(2)

    def race() -> None:
        with _raw(fl) as raw:
            barrier.wait()
            results.append(_enroll(raw, token, "agent").status_code)

    threads = [threading.Thread(target=race) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [200, 403]
    # a real agent with it is refused, and says why
    (fl.root / "once.token").write_text(token)
    agent = Proc("once-2", [*ZY, "agent", "--state-dir", str(fl.root / "agents" / "once-2"), "--join-file",
                            str(fl.root / "once.token")], fl.root / "agent-once-2.log", fl.env)
    assert agent.popen.wait(30) == 2
    assert "used up" in agent.output()
    agent.kill()  # closes its log
    listing = _zy(fl, "token", "list")
    assert listing.returncode == 0, listing.stderr
    header, *lines = listing.stdout.splitlines()
    assert header.split()[:5] == ["ID", "KIND", "USES", "EXPIRES", "STATE"]
    row = next(line.split() for line in lines if line.startswith(token_id))
    assert row[1] == "agent" and row[2] == "1/1" and row[5] == "used" and row[-1] == "once"


def test_a_single_use_token_lets_its_one_uuid_enroll_again_after_a_crash(fl: Fleet) -> None:
    """An agent that crashed before saving its credential enrolls again with the same uuid:
    not another use, so a --uses 1 token must not strand it; any other uuid is still refused."""
    proc = _zy(fl, "token", "create", "--uses", "1")
    assert proc.returncode == 0, proc.stderr
    token, me = proc.stdout.strip(), str(uuidlib.uuid4())
    with _raw(fl) as raw:
        assert _enroll(raw, token, "agent", uuid=me).status_code == 200
        again = _enroll(raw, token, "agent", uuid=me)
        assert again.status_code == 200, again.text
        other = _enroll(raw, token, "agent")
        assert other.status_code == 403 and "used up" in other.json()["error"]


def test_a_proxy_token_shows_in_the_list_and_a_proxy_with_an_agent_token_is_refused(fl: Fleet) -> None:
    token = _proxy_token(fl, "127.0.0.1", "localhost", uses=2)
    listing = _zy(fl, "token", "list").stdout
    token_id = JoinToken.decode(token).token_id
    row = next(line for line in listing.splitlines() if line.startswith(token_id))
    assert row.split()[1:3] == ["proxy", "0/2"] and "[127.0.0.1, localhost]" in row
    (fl.root / "agent.token").write_text(fl.token)
    proxy = Proc("bad-proxy", [*ZY, "proxy", "--data-dir", str(fl.root / "proxies" / "bad"), "--listen",
                               "127.0.0.1:0", "--join-file", str(fl.root / "agent.token"), "--upstream", fl.url],
                 fl.root / "proxy-bad.log", fl.env)
    assert proxy.popen.wait(30) == 2
    assert "this join token enrolls agents" in proxy.output()
    proxy.kill()  # closes its log


def test_enrolling_a_hostname_already_taken_warns(fl: Fleet) -> None:
    first = fl.start_agent("dup-a", extra=["--hostname", "twin"])
    wait_for(lambda: "connecting to" in first.output(), 30, "the first twin to enroll")
    second = fl.start_agent("dup-b", extra=["--hostname", "twin"])
    wait_for(lambda: "connecting to" in second.output(), 30, "the second twin to enroll")
    assert "warning from the master: hostname 'twin' is already used by 1 other enrolled agent" in second.output()
    assert "already used" not in first.output()
    assert fl.master is not None and "hostname 'twin' is already used" in fl.master.output()


def test_an_old_data_dir_is_migrated(tmp_path: Path) -> None:
    """A master data dir from before token kinds and the proxy CA: tokens gain the new columns
    (and are agent tokens), the proxy CA is made, the master CA is untouched."""
    from master.bootstrap import Paths, ensure_pki
    from master.store import SQLiteStore as Store

    db = tmp_path / "master.db"
    with contextlib.closing(sqlite3.connect(db)) as old:
        old.execute("CREATE TABLE join_tokens (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, created_at REAL "
                    "NOT NULL, expires_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, description TEXT NOT "
                    "NULL DEFAULT '', uses INTEGER NOT NULL DEFAULT 0)")
        old.execute("INSERT INTO join_tokens(id, secret_hash, created_at, expires_at) VALUES('old', 'h', 0, 9e9)")
        old.commit()
    store = Store(db)
    try:
        row = store.join_token("old")
        assert row is not None and row["kind"] == "agent" and row["max_uses"] == 0 and row["proxy_names"] == []
    finally:
        store.close()
    paths = Paths(tmp_path)
    ensure_pki(paths, ["127.0.0.1"])
    paths.proxy_ca_cert.unlink()
    ca = paths.ca_cert.read_bytes()
    assert ensure_pki(paths, ["127.0.0.1"]) is True and paths.proxy_ca_cert.exists()
    assert paths.ca_cert.read_bytes() == ca and ensure_pki(paths, ["127.0.0.1"]) is False


# -- hole 2: where the token is visible -------------------------------------------------------------

def _proc_text(pid: int, what: str) -> bytes:
    return Path(f"/proc/{pid}/{what}").read_bytes()


def _secrets(token: str) -> list[bytes]:
    return [token.encode(), JoinToken.decode(token).secret.encode()]


def _assert_clean(pid: int, token: str) -> None:
    for what in ("cmdline", "environ"):
        text = _proc_text(pid, what)
        assert not any(s in text for s in _secrets(token)), f"/proc/{pid}/{what} holds the join token"
    assert b"ZY_JOIN_TOKEN" not in _proc_text(pid, "environ")


def _whoami(fl: Fleet, name: str) -> tuple[str, int, str]:
    df = fl.client.run("echo $ZY_AGENT_VERSION $ZY_AGENT_PID; env", targets=name, timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "ok", df.loc[0, "error"]
    first, _, env = str(df.loc[0, "stdout"]).partition("\n")
    version, pid = first.split()
    return version, int(pid), env


def _agent(fl: Fleet, name: str, join: list[str], env: dict[str, str] | None = None) -> Proc:
    argv = [*ZY, "agent", "--state-dir", str(fl.root / "agents" / name), "--hostname", name, "--heartbeat", "2",
            "--backoff-cap", "2", *join]
    proc = Proc(name, argv, fl.root / f"agent-{name}.log", {**fl.env, **(env or {})})
    fl.agents[name] = proc
    return proc


def test_a_token_in_the_environment_is_gone_after_enrollment(fl: Fleet) -> None:
    token = fl.client.create_join_token(ttl=600)["token"]
    agent = _agent(fl, "env-1", [], {"ZY_JOIN_TOKEN": token})
    fl.wait_online("env-1")
    _, pid, env = _whoami(fl, "env-1")
    assert pid == agent.popen.pid  # the same process, re-executed after enrolling
    _assert_clean(pid, token)
    assert "ZY_JOIN_TOKEN" not in env and JoinToken.decode(token).secret not in env  # nor do its commands get it
    assert "warning: --join" not in agent.output()


def test_a_token_file_stays_out_of_the_process(fl: Fleet) -> None:
    token = fl.client.create_join_token(ttl=600)["token"]
    path = fl.join_file(token)
    agent = _agent(fl, "file-1", ["--join-file", str(path)])
    fl.wait_online("file-1")
    _, pid, _ = _whoami(fl, "file-1")
    assert pid == agent.popen.pid
    _assert_clean(pid, token)
    assert str(path).encode() not in _proc_text(pid, "cmdline")  # not passed on either


def test_join_on_the_command_line_warns_and_is_not_passed_on_even_to_a_new_build(fl: Fleet,
                                                                                 tmp_path: Path) -> None:
    token = fl.client.create_join_token(ttl=600)["token"]
    agent = _agent(fl, "argv-1", ["--join", token])
    fl.wait_online("argv-1")
    assert "warning: --join puts the join token in the process arguments" in agent.output()
    _, pid, _ = _whoami(fl, "argv-1")
    assert pid == agent.popen.pid
    _assert_clean(pid, token)

    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_agent.py"), "--only", "pyz", "--version",
                    "9.9.9+trust-test", "--out", str(tmp_path)], check=True, capture_output=True)
    df = fl.client.agents.update("argv-1", build=tmp_path / "zy-agent.pyz")
    assert df.iloc[0]["status"] == "ok", df.iloc[0]["error"]
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or b"zombie" in _proc_text(pid, "status").lower(), 30,
             "the old build to exit")
    version, new_pid, env = _whoami(fl, "argv-1")
    try:
        assert version == "9.9.9+trust-test" and new_pid != pid
        _assert_clean(new_pid, token)
        assert "ZY_JOIN_TOKEN" not in env
    finally:
        with contextlib.suppress(OSError):
            os.kill(new_pid, signal.SIGKILL)  # it runs in a session of its own


def test_a_proxy_keeps_its_token_out_of_its_process(fl: Fleet) -> None:
    token = _proxy_token(fl, "127.0.0.1", uses=1)
    argv = [*ZY, "proxy", "--data-dir", str(fl.root / "proxies" / "env-proxy"), "--listen", "127.0.0.1:0",
            "--hostname", "env-proxy", "--upstream", fl.url]
    proxy = Proc("env-proxy", argv, fl.root / "proxy-env-proxy.log", {**fl.env, "ZY_JOIN_TOKEN": token})
    fl.agents["env-proxy"] = proxy
    fl.wait_online("env-proxy")
    _assert_clean(proxy.popen.pid, token)  # re-executed (same pid) without it
    assert "warning: --join" not in proxy.output()
    token = _proxy_token(fl, "127.0.0.1", uses=1)
    argv = [*ZY, "proxy", "--data-dir", str(fl.root / "proxies" / "argv-proxy"), "--listen", "127.0.0.1:0",
            "--hostname", "argv-proxy", "--upstream", fl.url, "--join", token]
    proxy = Proc("argv-proxy", argv, fl.root / "proxy-argv-proxy.log", fl.env)
    fl.agents["argv-proxy"] = proxy
    fl.wait_online("argv-proxy")
    assert "warning: --join puts the join token" in proxy.output()
    _assert_clean(proxy.popen.pid, token)
    # a proxy token's names must cover where the proxy is reached, or it says so before enrolling
    other = _proxy_token(fl, "p2.example")
    proc = subprocess.run([*ZY, "proxy", "--data-dir", str(fl.root / "proxies" / "p2"), "--listen", "127.0.0.1:0",
                           "--advertise", "https://p3.example:8444", "--join-file", str(fl.join_file(other)),
                           "--upstream", fl.url], capture_output=True, text=True, timeout=60, env=fl.env)
    assert proc.returncode == 2
    assert "this proxy serves p3.example, which its join token does not name" in proc.stderr
