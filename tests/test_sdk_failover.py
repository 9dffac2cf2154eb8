"""Every master's URL in client.toml, ZY_MASTER and join tokens; the SDK fails over between them.

Real master and agent processes on loopback. "Dead" URLs are real sockets: a closed port
(refused), a listener that drops every TLS handshake, and a plain-HTTP listener that reads a
request and hangs up without answering (the request may have reached a master: never resent).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import ZY, Fleet, Proc, wait_for
from hcsdk import Client
from hcsdk.common.config import ClientConfig, load_client_config, parse_urls, write_client_config
from hcsdk.common.errors import ConfigError, MasterUnreachable, ZyError
from master.store import open_store

# -- config: read and write ----------------------------------------------------------------------


def test_client_config_round_trip_keeps_every_url_and_the_old_url_key(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "client.toml"
    cfg = ClientConfig(urls=("https://a:8443", "https://b:8443"), token="tok", ca=str(tmp_path / "ca.pem"))
    write_client_config(path, cfg)
    text = path.read_text()
    assert 'url = "https://a:8443"' in text  # older readers look for url only
    assert 'urls = ["https://a:8443", "https://b:8443"]' in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("ZY_CONFIG", str(path))
    assert load_client_config() == cfg


def test_an_old_client_toml_with_one_url_is_one_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "client.toml"
    path.write_text('url = "https://old:8443/"\ntoken = "t"\nca = "ca.pem"\n')
    monkeypatch.setenv("ZY_CONFIG", str(path))
    cfg = load_client_config()
    assert cfg.url == "https://old:8443" and cfg.urls == ("https://old:8443",)
    assert cfg.ca == str(tmp_path / "ca.pem")  # relative to the file, as before
    path.write_text('urls = ["https://x:1", "https://y:2"]\ntoken = "t"\n')
    assert load_client_config().urls == ("https://x:1", "https://y:2")


@pytest.mark.parametrize(("body", "expected"), [
    ('token = "t"\n', "lacks the key 'url' (or 'urls')"),
    ('url = "https://a:1"\n', "lacks the key 'token'"),
    ('urls = "https://a:1"\ntoken = "t"\n', "'urls' must be a list"),
    ('urls = []\ntoken = "t"\n', "names no master URL"),
    ('urls = ["https://a:1", 7]\ntoken = "t"\n', "must be a string, got 7"),
    ('urls = ["a:1"]\ntoken = "t"\n', "'a:1' is not a master URL"),
])
def test_a_bad_client_toml_says_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str,
                                              expected: str) -> None:
    path = tmp_path / "client.toml"
    path.write_text(body)
    monkeypatch.setenv("ZY_CONFIG", str(path))
    with pytest.raises(ConfigError, match="client config .*" + expected.replace("(", r"\(").replace(")", r"\)")):
        load_client_config()


def test_zy_master_takes_several_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZY_CONFIG", raising=False)
    monkeypatch.setenv("ZY_MASTER", " https://a:1/, ,https://b:2,https://a:1")
    monkeypatch.setenv("ZY_TOKEN", "t")
    cfg = load_client_config()
    assert cfg.urls == ("https://a:1", "https://b:2") and cfg.url == "https://a:1"
    monkeypatch.setenv("ZY_MASTER", ",")
    with pytest.raises(ConfigError, match="ZY_MASTER names no master URL"):
        load_client_config()


def test_client_config_keeps_its_old_constructor() -> None:
    assert ClientConfig(url="https://a:1", token="t").urls == ("https://a:1",)
    # a url not among urls goes first: it is the preferred one
    assert ClientConfig(url="https://c:3", urls=("https://a:1",), token="t").urls == ("https://c:3", "https://a:1")
    with pytest.raises(ConfigError, match="needs a master URL"):
        ClientConfig(token="t")
    assert parse_urls(["https://a:1"], "x") == ("https://a:1",)


# -- sockets that are not a master ----------------------------------------------------------------


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"https://127.0.0.1:{sock.getsockname()[1]}"


class FakeListener:
    """A listener on loopback: ``drop`` closes each connection at once (a TLS handshake fails),
    ``hangup`` reads a request's head and closes without answering, ``answer`` replies 503."""

    def __init__(self, mode: str):
        self.mode = mode
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.mode == 'drop' else 'http'}://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                if self.mode == "drop":
                    continue
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        break
                    head += data
                self.requests += 1
                if self.mode == "answer":
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                 b"content-length: 24\r\nconnection: close\r\n\r\n" b'{"error": "maintenance"}')

    def close(self) -> None:
        self._sock.close()


# -- against a real master ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("failover"))
    try:
        fleet.start_master()
        fleet.start_agent("fo-1")
        fleet.wait_online("fo-1")
        yield fleet
    finally:
        fleet.close()


def _client(fleet: Fleet, *urls: str) -> Client:
    return Client(list(urls), token=fleet.admin_token, ca=str(fleet.root / "master" / "ca.pem"))


def _marker_run(client: Client, marker: Path) -> None:
    _marker_run_on(client, "fo-1", marker)


def _marker_run_on(client: Client, target: str, marker: Path) -> None:
    """A run that leaves one line in ``marker`` each time the agent runs it (the agent is local)."""
    df = client.run(f"echo ran >> {marker}", targets=target, timeout=30).to_dataframe()
    assert list(df["status"]) == ["ok"], df.to_dict("records")


def _runs_seen(fleet: Fleet) -> int:
    """Tasks the master has sent (one per run here: each run targets one online agent)."""
    return int(fleet.client.status()["dispatched"])


def test_a_dead_url_first_then_the_live_master(one: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    dropper = FakeListener("drop")
    try:
        before = _runs_seen(one)
        with _client(one, closed_port_url(), dropper.url, one.url) as client:
            assert client.urls[2] == one.url
            _marker_run(client, marker)
            assert client.url == one.url  # remembered: the next request goes there first
            _marker_run(client, marker)
        assert marker.read_text().splitlines() == ["ran", "ran"]  # each run ran once
        assert _runs_seen(one) - before == 2
    finally:
        dropper.close()


def _unnamed_run(client: Client, marker: Path) -> None:
    """A run request as an older SDK sent it: no run id, so not safe to send twice."""
    body = {"cmd": "shell", "args": {"script": f"echo ran >> {marker}"}, "targets": {"expr": "fo-1"}, "timeout": 30}
    portal_call(client, lambda link: link.request("POST", "/api/v1/runs", json=body))


def portal_call(client: Client, fn):  # type: ignore[no-untyped-def]
    from hcsdk._portal import portal

    return portal().call(fn, client._async._link)


def test_a_request_that_may_have_reached_a_master_is_never_sent_to_another(one: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hangup = FakeListener("hangup")
    try:
        before = _runs_seen(one)
        with _client(one, hangup.url, one.url) as client:
            with pytest.raises(MasterUnreachable, match=f"cannot reach the master at {hangup.url}"):
                _unnamed_run(client, marker)
            assert hangup.requests == 1 and not marker.exists() and _runs_seen(one) == before
            # a read changes nothing: it may go on to the next master, which then stays current
            assert client.status()["agents_online"] == 1 and client.url == one.url
            _marker_run(client, marker)
        assert marker.read_text().splitlines() == ["ran"] and _runs_seen(one) - before == 1
    finally:
        hangup.close()


def test_a_named_run_that_may_have_reached_a_master_goes_on_to_the_next_and_runs_once(one: Fleet,
                                                                                      tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hangup = FakeListener("hangup")
    try:
        before = _runs_seen(one)
        with _client(one, hangup.url, one.url) as client:
            _marker_run(client, marker)  # the SDK names its runs: resent to the live master
            assert hangup.requests == 1 and client.url == one.url
        assert marker.read_text().splitlines() == ["ran"] and _runs_seen(one) - before == 1
    finally:
        hangup.close()


def _post_run(fleet: Fleet, body: dict[str, object]) -> tuple[int, dict[str, Any]]:
    import ssl

    import httpx

    with httpx.Client(verify=ssl.create_default_context(cafile=str(fleet.root / "master" / "ca.pem")),
                      headers={"authorization": f"Bearer {fleet.admin_token}"}) as http:
        resp = http.post(f"{fleet.url}/api/v1/runs", json=body, timeout=30)
    reply: dict[str, Any] = resp.json()
    return resp.status_code, reply


def test_a_run_id_makes_one_run_however_often_it_is_sent(one: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    run_id = "r" + "5a" * 8
    body = {"cmd": "shell", "args": {"script": f"echo ran >> {marker}"}, "targets": {"expr": "fo-1"},
            "timeout": 30, "run_id": run_id}
    code, first = _post_run(one, body)
    assert code == 200 and first["run_id"] == run_id and "replayed" not in first
    code, again = _post_run(one, body)
    assert code == 200 and again["replayed"] is True
    assert [t["taskid"] for t in again["targets"]] == [t["taskid"] for t in first["targets"]]
    wait_for(lambda: marker.exists(), 30, "the named run ran")
    time.sleep(1.0)  # a second run would have written its line by now
    assert marker.read_text().splitlines() == ["ran"]
    # the same id for another command: refused, and the first run is untouched
    code, other = _post_run(one, {**body, "args": {"script": "echo other"}})
    assert code == 409 and "exists with another command" in str(other["error"])


@pytest.mark.parametrize("bad", ["r12", "r" + "a" * 12, "R" + "a" * 16, "r" + "a" * 33, "r" + "g" * 16,
                                 "../r" + "a" * 12, 7])
def test_a_malformed_run_id_is_refused_and_makes_no_run(one: Fleet, bad: object) -> None:
    before = _runs_seen(one)
    code, answer = _post_run(one, {"cmd": "shell", "args": {"script": "true"}, "targets": {"expr": "fo-1"},
                                   "run_id": bad})
    assert code == 422 and "run_id" in json.dumps(answer)
    assert _runs_seen(one) == before


def test_an_http_answer_is_final_even_for_a_read(one: Fleet) -> None:
    busy = FakeListener("answer")
    try:
        with _client(one, busy.url, one.url) as client:
            with pytest.raises(ZyError, match="503.*maintenance"):
                client.status()
            assert busy.requests == 1 and client.url == busy.url
    finally:
        busy.close()


def test_when_no_master_answers_the_error_names_each_url(one: Fleet) -> None:
    dead, dropper = closed_port_url(), FakeListener("drop")
    try:
        with _client(one, dead, dropper.url) as client:
            with pytest.raises(MasterUnreachable) as caught:
                client.status()
        text = str(caught.value)
        assert text.startswith("no master answered (2 tried): ")
        assert f"cannot reach the master at {dead}: " in text and f"cannot reach the master at {dropper.url}: " in text
    finally:
        dropper.close()


def test_zy_master_with_several_urls_on_the_command_line(one: Fleet) -> None:
    env = {**one.env, "ZY_CONFIG": "", "ZY_TOKEN": one.admin_token, "ZY_CA": str(one.root / "master" / "ca.pem"),
           "COLUMNS": "200"}
    dead = closed_port_url()
    res = subprocess.run([*ZY, "inventory"], capture_output=True, text=True, timeout=60,
                         env={**env, "ZY_MASTER": f"{dead},{one.url}"})
    assert res.returncode == 0 and "1 agent, 1 online" in res.stdout, res.stderr
    other = closed_port_url()
    res = subprocess.run([*ZY, "inventory"], capture_output=True, text=True, timeout=60,
                         env={**env, "ZY_MASTER": f"{dead}, {other}"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert dead in res.stderr and other in res.stderr and "no master answered (2 tried)" in res.stderr


def test_the_master_writes_every_url_into_client_toml(one: Fleet) -> None:
    import tomllib

    data = tomllib.loads(one.config_path.read_text())
    assert data["url"] == data["urls"][0] and data["url"].endswith(f":{one.port}")


def _token_urls(token: str) -> list[str]:
    raw = token.removeprefix("zyj1.")
    return list(json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))["u"])


def test_join_tokens_carry_every_live_masters_urls_this_one_first(one: Fleet) -> None:
    own = _token_urls(one.client.create_join_token(ttl=60)["token"])
    store = open_store(one.root / "master")  # the registry as another master would write it
    try:
        now = time.time()
        store.register_master("zz-live", ["https://live.example:8443", own[0]], now)
        store.register_master("zz-dead", ["https://dead.example:8443"], now - 3600)
        urls = _token_urls(one.client.create_join_token(ttl=60)["token"])
        assert urls == [*own, "https://live.example:8443"]
        # what the caller names (proxies) is what the token carries
        named = one.client.create_join_token(ttl=60, proxies=["https://proxy.example:9443"])["token"]
        assert _token_urls(named) == ["https://proxy.example:9443"]
    finally:
        store.forget_master("zz-live")
        store.forget_master("zz-dead")
        store.close()


def test_a_stream_resumes_from_its_cursor_across_a_master_restart(one: Fleet) -> None:
    count = 40
    script = f"for i in $(seq 1 {count}); do echo line-$i; sleep 0.1; done"
    with _client(one, closed_port_url(), one.url) as client:
        run = client.run(script, targets="fo-1", timeout=120)
        seen: list[tuple[str, int, str]] = []
        restarted = False
        for event in run.events():
            if event.kind == "stdout":
                seen.append((event.taskid, event.seq, event.data))
                if not restarted and len(seen) >= 5:
                    one.restart_master()  # SIGKILL, then up again on the same port
                    restarted = True
        assert restarted and run.done
        keys = [(taskid, seq) for taskid, seq, _ in seen]
        assert len(keys) == len(set(keys)), "an event came twice"
        text = "".join(data for _, _, data in seen)
        assert text.splitlines() == [f"line-{i}" for i in range(1, count + 1)], "an event was lost"
        assert list(run.to_dataframe()["status"]) == ["ok"]
    one.wait_online("fo-1")



# -- two masters on one PostgreSQL --------------------------------------------------------------


def _second_master(fleet: Fleet, pg_url: str) -> tuple[Proc, str]:
    """A second master on the first one's store, with a copy of its key file (what an operator does)."""
    data = fleet.root / "master-b"
    data.mkdir()
    key = data / "cluster.key"
    shutil.copyfile(fleet.root / "master" / "cluster.key", key)
    key.chmod(0o600)
    argv = [*ZY, "master", "--data-dir", str(data), "--listen", "127.0.0.1:0", "--no-user-config",
            "--store", pg_url, "--key-file", str(key)]
    proc = Proc("master-b", argv, fleet.root / "master-b.log", fleet.env)
    match = wait_for(lambda: re.search(r"listening on (https://\S+)", proc.output()) if proc.alive
                     else pytest.fail("master b exited:\n" + proc.output()), 60, "master b to listen")
    return proc, f"https://127.0.0.1:{match.group(1).rsplit(':', 1)[1]}"


def _connected_to(agent: Proc) -> str:
    found = re.findall(r"connected to (https://\S+)", agent.output())
    return str(found[-1]) if found else ""


def test_two_masters_the_sdk_moves_to_the_other_when_its_master_dies(tmp_path: Path, pg_url: str) -> None:
    fleet = Fleet(tmp_path, master_args=["--store", pg_url])
    second: Proc | None = None
    try:
        fleet.start_master()
        second, url_b = _second_master(fleet, pg_url)
        # every live master's URL: in the token (this master's first) and in the newer client.toml
        def token_naming_b() -> list[str] | None:
            urls = _token_urls(fleet.client.create_join_token(ttl=600)["token"])
            return urls if url_b in urls else None

        token_urls = wait_for(token_naming_b, 30, "master b in a join token")
        assert token_urls[0] == fleet.url
        import tomllib
        assert tomllib.loads((fleet.root / "master-b" / "client.toml").read_text())["urls"][:2] == [url_b, fleet.url]
        fleet._token = fleet.client.create_join_token(ttl=600)["token"]
        agent = fleet.start_agent("duo-1")
        fleet.wait_online("duo-1")
        # the SDK prefers the master holding the agent; that one dies mid-run
        held = wait_for(lambda: _connected_to(agent), 30, "the agent's master")
        other = url_b if held == fleet.url else fleet.url
        victim = fleet.master if held == fleet.url else second
        assert victim is not None and held in (fleet.url, url_b), held
        count = 40
        marker = tmp_path / "ran"
        with _client(fleet, held, other) as client:
            run = client.run(f"echo ran >> {marker}; for i in $(seq 1 {count}); do echo line-$i; sleep 0.2; done",
                             targets="duo-1", timeout=120)
            seen: list[tuple[str, int, str]] = []
            for event in run.events():
                if event.kind == "stdout":
                    seen.append((event.taskid, event.seq, event.data))
                    if len(seen) == 5:
                        victim.kill()  # SIGKILL: no goodbye to the agent or the SDK
            keys = [(taskid, seq) for taskid, seq, _ in seen]
            assert len(keys) == len(set(keys)), "an event came twice"
            assert "".join(d for _, _, d in seen).splitlines() == [f"line-{i}" for i in range(1, count + 1)]
            assert client.url == other and list(run.to_dataframe()["status"]) == ["ok"]
            _marker_run_on(client, "duo-1", marker)  # a new run, on the master left
        assert marker.read_text().splitlines() == ["ran", "ran"]  # each run ran once
    finally:
        if second is not None:
            second.stop()
        fleet.close()
