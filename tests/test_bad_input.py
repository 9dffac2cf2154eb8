"""Bad input gets a clear error and loses nothing; auth failures get 401/403 and nothing else."""

from __future__ import annotations

import dataclasses
import json
import re
import ssl
import struct
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from fleet import ZY, Fleet, Proc, wait_for
from hcsdk import AuthError, Client, JoinToken, RequestError, TargetError, UsageError
from hcsdk.net.tls import client_context
from hcsdk.protocol.e2e import b64, new_keypair


def _frame(msg: dict) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">I", len(body)) + body


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("bad"), ["--offline-grace", "2", "--max-frame", "1048576"])
    fleet.start_master()
    fleet.start_agent("ok-1")
    fleet.start_agent("ok-2")
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def _api(fleet: Fleet, token: str | None = "admin") -> httpx.Client:
    headers = {}
    if token == "admin":
        token = tomllib.loads(fleet.config_path.read_text())["token"]
    if token:
        headers["authorization"] = f"Bearer {token}"
    ca = (fleet.root / "master" / "ca.pem").read_bytes()
    return httpx.Client(base_url=fleet.url, verify=client_context(ca), headers=headers, timeout=30)


def _still_works(fleet: Fleet) -> None:
    df = fleet.client.run("echo fine", targets="ok-*", timeout=30).to_dataframe()
    assert (df["status"] == "ok").all() and len(df) == 2


def test_malformed_json_is_a_400_naming_the_problem(fl: Fleet) -> None:
    with _api(fl) as api:
        resp = api.post("/api/v1/runs", content=b'{"cmd": "shell", "args": {',
                        headers={"content-type": "application/json"})
        assert resp.status_code == 400
        assert "malformed JSON" in resp.json()["error"]
        resp = api.post("/api/v1/runs", content=b'{"cmd": "shell", "args": {"script": "\xff\xfe"}}',
                        headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "not valid UTF-8 (byte 37)" in resp.json()["error"], resp.text
        for route in ("/v1/enroll", "/v1/handshake"):
            resp = api.post(route, content=b'{"token": ', headers={"authorization": f"Bearer {_agent_cred(fl)}"})
            assert resp.status_code == 400 and "malformed JSON" in resp.json()["error"], (route, resp.text)
        resp = api.post("/api/v1/runs", json={"cmd": "shell", "args": {}, "targets": {"expr": "ok-1"}})
        assert resp.status_code == 422 and "args.script" in resp.json()["error"]
        resp = api.post("/api/v1/runs", json={"cmd": "shell", "args": {"script": "x"}, "targets": {"expr": "ok-1"},
                                              "timeout": -1})
        assert resp.status_code == 422 and "timeout" in resp.json()["error"]
    _still_works(fl)


def test_arguments_too_large_for_one_message_are_413(fl: Fleet) -> None:
    with pytest.raises(RequestError, match="fit in one message") as info:
        fl.client.run("echo " + "x" * 2_000_000, targets="ok-1")
    assert info.value.status == 413


def test_non_utf8_script_is_refused_by_the_sdk(fl: Fleet) -> None:
    with pytest.raises(UsageError, match="not valid UTF-8"):
        fl.client.run(b"echo \xff\xfe", targets="ok-1")


def test_oversized_request_body_is_413(fl: Fleet) -> None:
    with _api(fl) as api:
        resp = api.post("/api/v1/runs", content=b"x" * (17 * 1024 * 1024), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "exceeds" in resp.json()["error"]
    _still_works(fl)


def test_target_list_of_100000_entries_is_a_clear_error(fl: Fleet) -> None:
    targets = [f"00000000-0000-0000-0000-{i:012d}" for i in range(100_000)]
    with pytest.raises(TargetError, match="100000 entries; at most 50000"):
        fl.client.run("true", targets=targets)
    _still_works(fl)


def test_api_token_missing_or_wrong_is_401(fl: Fleet) -> None:
    with _api(fl, token=None) as api:
        resp = api.get("/api/v1/inventory")
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        assert set(resp.json()) == {"error", "kind"}
    with _api(fl, token="zya_wrong") as api:
        assert api.get("/api/v1/inventory").status_code == 401
    bad = Client(fl.url, token="zya_wrong", ca=str(fl.root / "master" / "ca.pem"))
    with pytest.raises(AuthError, match="401"):
        bad.inventory()
    bad.close()


def test_channel_routes_need_an_agent_credential_and_unknown_routes_404(fl: Fleet) -> None:
    with _api(fl, token=None) as api:
        assert api.post("/v1/handshake", json={}).status_code == 401
        assert api.get("/v1/channel/down", params={"sid": "x"}).status_code == 401
        assert api.get("/v1/admin").status_code == 404
        assert api.get("/etc/passwd").status_code == 404
        # the admin token is no agent credential
    with _api(fl) as api:
        assert api.post("/v1/handshake", json={}).status_code == 401


def _fake_agent(fl: Fleet, client: httpx.Client) -> tuple[str, dict[str, str]]:
    """Enroll a raw HTTP client as an agent (the master is under test here, not the agent)."""
    token = JoinToken.decode(fl.client.create_join_token(ttl=600)["token"])
    uuid = "fake0000-0000-4000-8000-" + str(time.time_ns())[-12:]
    resp = client.post("/v1/enroll", json={"token": token.credential, "uuid": uuid, "facts": {"hostname": "fake"},
                                           "e2e_pub": b64(new_keypair()[1])})
    assert resp.status_code == 200, resp.text
    headers = {"authorization": f"Bearer {uuid}:{resp.json()['credential']}"}
    return uuid, headers


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x05hello",                       # not JSON
        b"\x00\x00\x00\x02[]",                          # JSON, not an object
        b'\x00\x00\x00\x0c{"t":"evil"}',                # unknown message type
        struct.pack(">I", 100 * 1024 * 1024) + b"{",   # a frame over the limit
        _frame({"t": "start", "taskid": "r1.0", "seq": 0, "p": [1]}),            # payload not an object
        _frame({"t": "done", "taskid": "r1.0", "seq": 1, "p": {"x": 1}}),        # done without a status
        _frame({"t": "out", "taskid": "r1.0", "seq": 99999999999999, "p": {}}),  # seq out of range
    ],
)
def test_agent_sending_garbage_frames_is_dropped_and_others_carry_on(fl: Fleet, garbage: bytes) -> None:
    ca = (fl.root / "master" / "ca.pem").read_bytes()
    with httpx.Client(base_url=fl.url, verify=client_context(ca), http2=True, timeout=30) as raw:
        uuid, headers = _fake_agent(fl, raw)
        sid = raw.post("/v1/handshake", json={"facts": {"hostname": "fake"}}, headers=headers).json()["sid"]
        resp = raw.post("/v1/channel/up", params={"sid": sid}, content=garbage, headers=headers)
        assert resp.status_code == 400 and "bad frame" in resp.json()["error"]
        # its session is gone: it must handshake again
        resp = raw.post("/v1/channel/poll", params={"sid": sid}, content=b"", headers=headers)
        assert resp.status_code == 409
    _still_works(fl)


@pytest.mark.parametrize("where", ["result", "unknown"])
def test_an_agent_nesting_a_payload_1000_deep_is_dropped_not_a_500(fl: Fleet, where: str) -> None:
    """orjson reads 1024 levels, the MAC's json.dumps runs out of stack near 1000: a well-formed
    done from an enrolled agent (its own uuid, so the master checks the MAC) nesting 1000 deep
    made the uplink answer 500. Now the decoder refuses it like any bad frame."""
    ca = (fl.root / "master" / "ca.pem").read_bytes()
    deep = "[" * 1000 + "]" * 1000  # written as text: json.dumps itself cannot nest this deep
    with httpx.Client(base_url=fl.url, verify=client_context(ca), http2=True, timeout=30) as raw:
        uuid, headers = _fake_agent(fl, raw)
        sid = raw.post("/v1/handshake", json={"facts": {"hostname": "fake"}}, headers=headers).json()["sid"]
        key = "result" if where == "result" else "x"
        body = (f'{{"t":"done","uuid":"{uuid}","taskid":"r1.0","seq":1,"m":"00",'
                f'"p":{{"status":"ok","{key}":{deep}}}}}').encode()
        resp = raw.post("/v1/channel/up", params={"sid": sid}, content=struct.pack(">I", len(body)) + body,
                        headers=headers)
        assert resp.status_code == 400 and "nests deeper than 64 levels" in resp.json()["error"], resp.text
        resp = raw.post("/v1/channel/poll", params={"sid": sid}, content=b"", headers=headers)
        assert resp.status_code == 409  # dropped: it must handshake again
    _still_works(fl)


def test_oversized_output_is_truncated_not_an_out_of_memory(fl: Fleet) -> None:
    fl.start_agent("cap-1", extra=["--output-cap", "100000"])
    fl.wait_online("cap-1")
    df = fl.client.run("head -c 3000000 /dev/zero | tr '\\0' a; echo tail >&2", targets="cap-1",
                       timeout=60).to_dataframe()
    assert df.loc[0, "status"] == "ok"
    assert len(df.loc[0, "stdout"]) == 100_000 and df.loc[0, "truncated"]
    assert df.loc[0, "stderr"] == "tail\n"


def test_expired_and_revoked_join_tokens_are_refused(fl: Fleet) -> None:
    expired = fl.client.create_join_token(ttl=0.5)["token"]
    time.sleep(1.0)
    proc = _agent_with_token(fl, "late-1", expired)
    assert proc.popen.wait(30) == 2
    assert "expired" in proc.output()
    revoked = fl.client.create_join_token(ttl=600)
    fl.client.revoke_join_token(revoked["id"])
    proc = _agent_with_token(fl, "late-2", revoked["token"])
    assert proc.popen.wait(30) == 2
    assert "revoked" in proc.output()


class Impostor:
    """A TLS server with a CA of its own, posing as a master: it serves that CA at /v1/ca and
    answers an enrollment as a master would, keeping every request it gets (method, path, and
    the authorization header and body, where a credential would be)."""

    def __init__(self, root: Path):
        from hcsdk.net.tls import issue_server_cert, make_ca

        self.ca, ca_key = make_ca()  # the same name a real master's CA has
        cert, key = issue_server_cert(self.ca, ca_key, ["127.0.0.1", "localhost"])
        root.mkdir(parents=True, exist_ok=True)
        (root / "cert.pem").write_bytes(cert)
        (root / "key.pem").write_bytes(key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(root / "cert.pem", root / "key.pem")
        self.seen: list[tuple[str, str, bytes]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        impostor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                impostor.seen.append(("GET", self.path, self.headers.get("authorization", "").encode()))
                self._answer(impostor.ca if self.path == "/v1/ca" else b"{}")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                impostor.seen.append(("POST", self.path, self.headers.get("authorization", "").encode() + body))
                self._answer(json.dumps({"credential": "captured", "cert": ""}).encode())

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[Impostor]:
    server = Impostor(tmp_path / "impostor")
    try:
        yield server
    finally:
        server.close()


def _exit_code(proc: Proc, timeout: float = 30) -> int | None:
    """How ``proc`` exited, or None if it still runs after ``timeout`` (an agent that enrolled)."""
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _never_enrolled(fl: Fleet, name: str) -> None:
    """``name`` holds no credential and no CA, and the master does not know it."""
    state = fl.root / "agents" / name
    ident = json.loads((state / "identity.json").read_text()) if (state / "identity.json").exists() else {}
    assert not ident.get("credential") and not (state / "ca.pem").exists(), sorted(p.name for p in state.iterdir())
    assert name not in set(fl.client.inventory()["hostname"])


def test_a_token_pinning_another_ca_is_refused(fl: Fleet) -> None:
    """The real master, but the token pins another (real) CA: the agent refuses to enroll."""
    from hcsdk.net.tls import ca_fingerprint, make_ca

    real = JoinToken.decode(fl.token)
    forged = dataclasses.replace(real, ca_fingerprint=ca_fingerprint(make_ca()[0]))
    proc = _agent_with_token(fl, "mitm-1", forged.encode())
    assert _exit_code(proc) == 2, proc.output()
    assert (f"the CA served by {real.urls[0]} does not match the join token's fingerprint: refusing to enroll"
            in proc.output()), proc.output()
    # both fingerprints, shortened to sha256: and 16 hex digits, so the operator can tell which CA is which
    short = len("sha256:") + 16
    assert (f"the token expects {forged.ca_fingerprint[:short]}..., the server sent {real.ca_fingerprint[:short]}..."
            in proc.output()), proc.output()
    assert forged.ca_fingerprint not in proc.output() and real.ca_fingerprint not in proc.output()
    _never_enrolled(fl, "mitm-1")
    _still_works(fl)


def test_an_agent_sends_its_join_token_only_to_the_pinned_ca(fl: Fleet, impostor: Impostor) -> None:
    """Someone in between (or a wrong URL) answers with another CA: the agent reads that CA,
    refuses it, and the join token's secret never leaves the agent."""
    real = JoinToken.decode(fl.token)
    proc = _agent_with_token(fl, "mitm-2", dataclasses.replace(real, urls=(impostor.url,)).encode())
    assert _exit_code(proc) == 2, (impostor.seen, proc.output())
    assert (f"the CA served by {impostor.url} does not match the join token's fingerprint: refusing to enroll"
            in proc.output()), proc.output()
    assert [(method, path) for method, path, _ in impostor.seen] == [("GET", "/v1/ca")]
    assert not any(real.secret.encode() in body for _, _, body in impostor.seen)
    _never_enrolled(fl, "mitm-2")


def test_an_enrolled_agent_refuses_a_master_its_ca_did_not_sign(fl: Fleet, impostor: Impostor) -> None:
    """The identity pins the master's CA: an enrolled agent sent to a server with another CA
    fails the TLS handshake and never sends it a request, so its credential stays its own."""
    agent = fl.start_agent("pin-1")
    fl.wait_online("pin-1")
    agent.stop()
    fl.wait_offline("pin-1")
    agent = fl.start_agent("pin-1", extra=["--master", impostor.url])
    refused = re.compile(rf"channel to {re.escape(impostor.url)} ended: .*CERTIFICATE_VERIFY_FAILED")
    wait_for(lambda: impostor.seen or refused.search(agent.output()), 30, "the agent to refuse the certificate")
    assert impostor.seen == [], f"the agent sent {impostor.seen} to a server its CA did not sign"
    assert agent.alive  # it keeps retrying (the real master may come back there), sending nothing
    agent.stop()


def test_revoked_agent_is_dropped_and_cannot_reconnect(fl: Fleet) -> None:
    agent = fl.start_agent("rev-1")
    fl.wait_online("rev-1")
    fl.client.revoke_agent(fl.uuid_of("rev-1"))
    assert agent.popen.wait(30) == 3
    assert "revoked" in agent.output()
    assert "rev-1" not in set(fl.client.inventory()["hostname"])
    with pytest.raises(TargetError):
        fl.client.run("true", targets="rev-1")


def _agent_with_token(fl: Fleet, name: str, token: str) -> Proc:
    argv = [*ZY, "agent", "--state-dir", str(fl.root / "agents" / name), "--hostname", name, "--join", token]
    proc = Proc(name, argv, fl.root / f"agent-{name}.log", fl.env)
    fl.agents[name] = proc
    return proc


def test_bad_join_token_text_is_a_clear_error(fl: Fleet) -> None:
    proc = _agent_with_token(fl, "typo-1", "zyj1.not-base64!!")
    assert proc.popen.wait(30) == 2
    assert "damaged" in proc.output()


def _agent_cred(fl: Fleet) -> str:
    import json

    ident = json.loads((fl.root / "agents" / "ok-1" / "identity.json").read_text())
    return f"{ident['uuid']}:{ident['credential']}"


def test_a_wrong_agent_secret_is_401_and_nothing_else(fl: Fleet) -> None:
    uuid = fl.uuid_of("ok-1")
    with _api(fl, token=None) as api:
        resp = api.post("/v1/handshake", json={"facts": {}}, headers={"authorization": f"Bearer {uuid}:wrong"})
    assert resp.status_code == 401 and resp.json() == {"error": "agent credential is not valid", "kind": "auth"}
    _still_works(fl)


def test_a_connected_agent_cannot_be_taken_over_by_re_enrolling(fl: Fleet) -> None:
    token = JoinToken.decode(fl.token)  # the token ok-1 enrolled with
    uuid = fl.uuid_of("ok-1")
    ca = (fl.root / "master" / "ca.pem").read_bytes()
    with httpx.Client(base_url=fl.url, verify=client_context(ca), timeout=30) as raw:
        resp = raw.post("/v1/enroll", json={"token": token.credential, "uuid": uuid, "facts": {},
                                            "e2e_pub": b64(new_keypair()[1])})
    assert resp.status_code == 403 and "already enrolled" in resp.json()["error"]
    _still_works(fl)


def test_ca_pin_refuses_a_bundle_that_smuggles_a_second_ca() -> None:
    from hcsdk.net.tls import ca_fingerprint, make_ca

    real, _ = make_ca()
    evil, _ = make_ca("evil")
    with pytest.raises(ValueError, match="exactly one certificate"):
        ca_fingerprint(real + evil)
    assert ca_fingerprint(real) != ca_fingerprint(evil)
