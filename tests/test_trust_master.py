"""Attacks on a real master (issue 13, holes 5-8 and 11): what an outsider, or the holder of one
agent credential, can make the master hold or do. Each test fails against the master before
the fix: it would hold the bodies, keep the honest agent out, read builds whole, cancel invented
schedules, or store forged samples.

Attackers connect from other loopback addresses (127.0.x.y) than the honest agents and the SDK
(127.0.0.1), as an outsider on the LAN would; the per-address cap is what tells them apart."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from fleet import Fleet, wait_for
from hcsdk import JoinToken
from hcsdk.net.tls import client_context
from hcsdk.protocol.e2e import b64, derive_key, new_keypair, sign, unb64
from hcsdk.protocol.wire import DOWN_TYPES, FrameDecoder, dumps

MiB = 1024 * 1024
ADDRESS_LIMIT = 8
#: the hand-driven agents' HTTP clients, closed with the fleet
_CLIENTS: list[httpx.Client] = []


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("trust"), [
        "--offline-grace", "30", "--address-limit", str(ADDRESS_LIMIT), "--body-timeout", "4",
        "--header-timeout", "3", "--downloads-per-credential", "2"])
    fleet.start_master()
    fleet.start_agent("honest-1")
    try:
        fleet.wait_online()
        yield fleet
    finally:
        for client in _CLIENTS:
            client.close()
        fleet.close()


# -- helpers: raw HTTP/1.1 over TLS, as an attacker writes it ------------------------------------

def _ca(fl: Fleet) -> bytes:
    return (fl.root / "master" / "ca.pem").read_bytes()


def _tls(fl: Fleet, src: str, timeout: float = 5.0) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cadata=_ca(fl).decode())
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", fl.port), timeout=timeout, source_address=(src, 0))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _head(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: master\r\ncontent-type: application/json\r\n{extra}\r\n".encode()


def _status(sock: ssl.SSLSocket, timeout: float) -> int | None:
    """The status of the answer on ``sock`` within ``timeout`` s; None when the connection
    closed without one; -1 when nothing came."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n" not in buf:
            data = sock.recv(4096)
            if not data:
                return None
            buf += data
    except TimeoutError:
        return -1
    except (OSError, ssl.SSLError):
        return None
    return int(buf.split(b" ", 2)[1])


def _send_chunked(sock: ssl.SSLSocket, total: int, piece: int = 256 * 1024) -> int:
    """Send ``total`` bytes of a chunked body that never ends; stop when the server stops taking
    them. Returns the bytes sent."""
    sock.settimeout(2)
    sent = 0
    data = b" " * piece
    try:
        while sent < total:
            sock.sendall(f"{piece:x}\r\n".encode() + data + b"\r\n")
            sent += piece
    except (OSError, ssl.SSLError):
        pass
    return sent


def _rss(fl: Fleet) -> int:
    assert fl.master is not None
    return int(psutil.Process(fl.master.popen.pid).memory_info().rss)


def _api(fl: Fleet) -> httpx.Client:
    return httpx.Client(base_url=fl.url, verify=client_context(_ca(fl)), timeout=60,
                        headers={"authorization": f"Bearer {fl.admin_token}"})


class FakeAgent:
    """An enrolled agent driven by hand: a real credential and end-to-end key, no agent code."""

    def __init__(self, fl: Fleet, name: str) -> None:
        token = JoinToken.decode(fl.client.create_join_token(ttl=600)["token"])
        self.uuid = f"f{name:0>7}-0000-4000-8000-" + str(time.time_ns())[-12:]
        private, public = new_keypair()
        self.http = httpx.Client(base_url=fl.url, verify=client_context(_ca(fl), http2=False), timeout=30)
        _CLIENTS.append(self.http)
        resp = self.http.post("/v1/enroll", json={"token": token.credential, "uuid": self.uuid, "e2e_pub": b64(public),
                                                  "facts": {"hostname": f"fake-{name}"}})
        assert resp.status_code == 200, resp.text
        self.auth = f"Bearer {self.uuid}:{resp.json()['credential']}"
        self.key = derive_key(private, unb64(token.e2e_public), self.uuid)
        self.http.headers["authorization"] = self.auth
        self.sid = ""

    def handshake(self, schedules: dict[str, str] | None = None) -> httpx.Response:
        body = {"facts": {"hostname": "fake"}, **({"schedules": schedules} if schedules is not None else {})}
        resp = self.http.post("/v1/handshake", json=body)
        if resp.status_code == 200:
            self.sid = resp.json()["sid"]
        return resp

    def send(self, msgs: list[dict]) -> httpx.Response:
        frames = b"".join(struct.pack(">I", len(b := dumps(sign(self.key, m)))) + b for m in msgs)
        return self.http.post("/v1/channel/poll", params={"sid": self.sid, "mode": "up"}, content=frames)

    def downlink(self, seconds: float) -> list[dict]:
        """What the master sends this agent over ``seconds`` of held polls."""
        decoder, got = FrameDecoder(4 * MiB, DOWN_TYPES), []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            resp = self.http.post("/v1/channel/poll", params={"sid": self.sid}, content=b"")
            assert resp.status_code == 200, resp.text
            got += decoder.feed(resp.content)
        return got


def _still_works(fl: Fleet) -> None:
    df = fl.client.run("echo fine", targets="honest-1", timeout=30).to_dataframe()
    assert list(df["status"]) == ["ok"]


# -- hole 5: big bodies, slow heads and bodies, many requests from one address ----------------

def test_big_unauthenticated_bodies_are_refused_before_they_are_held(fl: Fleet) -> None:
    """Without the fix every enrollment and API request here parked 8 MiB in the master."""
    base = _rss(fl)
    socks = []
    for i in range(16):
        sock = _tls(fl, src=f"127.0.1.{i + 1}")
        sock.sendall(_head("POST", "/v1/enroll" if i % 2 else "/api/v1/runs", "transfer-encoding: chunked\r\n"))
        _send_chunked(sock, 8 * MiB)
        socks.append(sock)
    time.sleep(1.0)
    grown = _rss(fl) - base
    statuses = [_status(s, 5) for s in socks]
    for sock in socks:
        sock.close()
    print(f"master RSS grew {grown / MiB:.0f} MiB under 16 x 8 MiB unauthenticated bodies; answers {statuses}")
    assert grown < 40 * MiB, f"the master held {grown / MiB:.0f} MiB of unauthenticated bodies"
    assert set(statuses) <= {401, 413, None}, statuses
    _still_works(fl)


def test_an_announced_oversized_enrollment_is_refused_before_its_body(fl: Fleet) -> None:
    sock = _tls(fl, src="127.0.1.100")
    sock.sendall(_head("POST", "/v1/enroll", f"content-length: {100 * MiB}\r\n"))
    assert _status(sock, 10) == 413
    sock.close()


def test_slow_request_heads_and_bodies_are_cut_off(fl: Fleet) -> None:
    """The fleet runs with a 3 s head deadline and a 4 s body deadline; without them a client
    holds its request open for as long as it trickles."""
    head = _tls(fl, src="127.0.2.1")
    head.sendall(b"POST /v1/enroll HTTP/1.1\r\nhost: master\r\n")  # ... and the rest never comes
    body = _tls(fl, src="127.0.2.2")
    body.sendall(_head("POST", "/v1/enroll", "content-length: 5000\r\n") + b"{")
    answer: int | None = -1
    end = time.monotonic() + 20
    while answer == -1 and time.monotonic() < end:
        try:
            body.sendall(b" ")  # a byte a second: never idle, never done
        except (OSError, ssl.SSLError):
            answer = None
            break
        answer = _status(body, 1.0)
    assert answer == 408, f"a trickled body got {answer} within 20 s (408 expected)"
    assert _status(head, 20) in (None, 408), "a request head that never ends kept its connection"
    head.close()
    body.close()


def test_one_address_cannot_hold_more_than_its_share_of_unauthenticated_requests(fl: Fleet) -> None:
    held = []
    for _ in range(ADDRESS_LIMIT):
        sock = _tls(fl, src="127.0.3.1")
        sock.sendall(_head("POST", "/v1/enroll", "content-length: 5000\r\n") + b"{")
        held.append(sock)
    time.sleep(0.5)
    extra = _tls(fl, src="127.0.3.1")
    extra.sendall(_head("POST", "/v1/enroll", "content-length: 2\r\n") + b"{}")
    assert _status(extra, 5) == 429
    # another address (the honest agent, the SDK) is not affected
    _still_works(fl)
    for sock in [*held, extra]:
        sock.close()


def test_many_addresses_cannot_multiply_their_share_without_bound(tmp_path: Path) -> None:
    """Each address has its share of requests not yet authenticated; a hostile review held
    3,000 stalled enrollments (426 MiB) from 12 addresses. Anonymous requests now have a total
    as well, while requests with a credential (the SDK, agents) still get in."""
    limit = 4
    fleet = Fleet(tmp_path, ["--address-limit", str(limit), "--body-timeout", "60"])
    fleet.start_master()
    fleet.start_agent("honest-1")
    held = []
    try:
        fleet.wait_online()
        for a in range(8):  # 8 addresses x their share = the total (8 x the share by default)
            for _ in range(limit):
                sock = _tls(fleet, src=f"127.0.7.{a + 1}")
                sock.sendall(_head("POST", "/v1/enroll", "content-length: 5000\r\n") + b"{")
                held.append(sock)
        time.sleep(0.5)
        extra = _tls(fleet, src="127.0.7.100")
        extra.sendall(_head("POST", "/v1/enroll", "content-length: 2\r\n") + b"{}")
        held.append(extra)
        assert _status(extra, 5) == 503, "an anonymous request past the total was not refused"
        _still_works(fleet)
    finally:
        for sock in held:
            sock.close()
        fleet.close()


# -- hole 6: slow handshakes of one credential -------------------------------------------------

def test_slow_handshakes_of_one_credential_do_not_keep_an_honest_agent_out(fl: Fleet) -> None:
    """40 trickled handshakes with one credential used to hold the 32 admission slots (and the
    queue) for as long as they trickled: an agent reconnecting meanwhile stayed offline."""
    fake = FakeAgent(fl, "slowhs")
    head = _head("POST", "/v1/handshake", f"authorization: {fake.auth}\r\ncontent-length: 100000\r\n") + b"{"

    def trickle() -> ssl.SSLSocket:
        sock = _tls(fl, src="127.0.4.1")
        sock.sendall(head)
        return sock

    socks = [trickle() for _ in range(40)]
    time.sleep(1.0)
    first = [_status(s, 0.2) for s in socks]
    assert first.count(409) >= 38, f"concurrent handshakes of one uuid were not refused at once: {first}"
    stop = threading.Event()

    def attack() -> None:  # a persistent attacker: 40 trickles, replaced as the master ends them
        live = list(socks)
        while not stop.is_set():
            for sock in list(live):
                try:
                    sock.sendall(b" ")
                except (OSError, ssl.SSLError):
                    live.remove(sock)
                    sock.close()
            while len(live) < 40 and not stop.is_set():
                try:
                    live.append(trickle())
                except OSError:
                    break
            stop.wait(0.5)
        for sock in live:
            sock.close()

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    try:
        honest = fl.agents["honest-1"]
        honest.stop()
        started = time.monotonic()
        fl.start_agent("honest-1")
        fl.wait_online("honest-1", timeout=20)
        _still_works(fl)
        print(f"honest agent back online and running a command {time.monotonic() - started:.1f} s after its "
              f"restart, under 40 slow handshakes")
    finally:
        stop.set()
        thread.join(10)


def test_slow_handshakes_of_many_enrolled_uuids_do_not_fill_the_admission_queue(tmp_path: Path) -> None:
    """One join token enrolls as many uuids as it likes; each trickling a handshake body used
    to count in the admission queue, so a queue-full of them answered every honest reconnect
    503 (a hostile review kept an agent out for over 90 s with 560). Bodies are now read
    before a handshake joins the queue."""
    queue = 8
    fleet = Fleet(tmp_path, ["--handshake-queue", str(queue), "--body-timeout", "30"])
    fleet.start_master()
    fleet.start_agent("honest-1")
    fakes = [FakeAgent(fleet, f"q{i}") for i in range(3 * queue)]
    stop = threading.Event()

    def trickle(fake: FakeAgent) -> ssl.SSLSocket:
        sock = _tls(fleet, src="127.0.4.2")
        sock.sendall(_head("POST", "/v1/handshake", f"authorization: {fake.auth}\r\ncontent-length: 100000\r\n")
                     + b"{")
        return sock

    def attack() -> None:  # every fake keeps one trickling handshake open, reopened as it ends
        live: dict[int, ssl.SSLSocket] = {}
        while not stop.is_set():
            for i, fake in enumerate(fakes):
                try:
                    if i not in live:
                        live[i] = trickle(fake)
                    live[i].sendall(b" ")
                except (OSError, ssl.SSLError):
                    live.pop(i).close()
            stop.wait(0.3)
        for sock in live.values():
            sock.close()

    thread = threading.Thread(target=attack, daemon=True)
    try:
        fleet.wait_online()
        thread.start()
        time.sleep(2.0)
        fleet.agents["honest-1"].stop()
        started = time.monotonic()
        fleet.start_agent("honest-1")
        fleet.wait_online("honest-1", timeout=30)
        df = fleet.client.run("echo fine", targets="honest-1", timeout=30).to_dataframe()
        assert list(df["status"]) == ["ok"]
        print(f"honest agent back {time.monotonic() - started:.1f} s after its restart, under "
              f"{len(fakes)} trickled handshakes against a queue of {queue}")
    finally:
        stop.set()
        thread.join(10)
        fleet.close()


# -- hole 7: parallel downloads of a big build ---------------------------------------------------

def test_parallel_downloads_are_streamed_and_capped_per_credential(fl: Fleet) -> None:
    """Eight downloads of a 48 MiB blob that the clients read slowly: each used to hold the
    whole file in the master."""
    data = os.urandom(MiB) * 48
    with _api(fl) as api:
        resp = api.post("/api/v1/blobs", content=data)
        assert resp.status_code == 200, resp.text
        sha = resp.json()["sha256"]
    fakes = [FakeAgent(fl, f"dl{i}") for i in range(4)]
    base = _rss(fl)
    socks = []
    for i, fake in enumerate(fakes):
        for j in range(2):
            sock = _tls(fl, src=f"127.0.5.{2 * i + j + 1}", timeout=30)
            sock.sendall(_head("GET", f"/v1/blob?sha256={sha}", f"authorization: {fake.auth}\r\n"))
            assert _status(sock, 30) == 200
            socks.append(sock)  # ... and read no further: the master must not buffer ahead
    time.sleep(2.0)
    grown = _rss(fl) - base
    third = _tls(fl, src="127.0.5.100")
    third.sendall(_head("GET", f"/v1/blob?sha256={sha}", f"authorization: {fakes[0].auth}\r\n"))
    assert _status(third, 10) == 429, "a third download of one credential was not refused"
    for sock in [*socks, third]:
        sock.close()
    print(f"master RSS grew {grown / MiB:.0f} MiB under 8 parallel downloads of a 48 MiB blob")
    assert grown < 64 * MiB, f"the master held {grown / MiB:.0f} MiB for 8 downloads of a 48 MiB file"

    # the slots come back when clients leave, and a download is whole and right
    def whole() -> bool:
        got = fakes[0].http.get("/v1/blob", params={"sha256": sha}, timeout=60)
        return got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha

    wait_for(whole, 30, "a full download once the others are gone")


def test_stalled_downloads_of_many_credentials_are_capped_in_all_and_dropped(tmp_path: Path) -> None:
    """One join token buys any number of credentials, each with its own share of downloads: a
    hostile review parked 1,200 stalled downloads (2.8 GiB) in the master with 150 of them. Now
    downloads in flight are capped in all, and a reader that stops reading is dropped."""
    fleet = Fleet(tmp_path, ["--downloads-total", "4", "--downloads-per-credential", "2", "--send-timeout", "2"])
    fleet.start_master()
    try:
        with _api(fleet) as api:
            resp = api.post("/api/v1/blobs", content=os.urandom(MiB) * 32)
            assert resp.status_code == 200, resp.text
            sha = resp.json()["sha256"]
        fakes = [FakeAgent(fleet, f"tot{i}") for i in range(3)]
        socks = []
        for fake in fakes[:2]:
            for _ in range(2):
                sock = _tls(fleet, src="127.0.6.1", timeout=30)
                sock.sendall(_head("GET", f"/v1/blob?sha256={sha}", f"authorization: {fake.auth}\r\n"))
                assert _status(sock, 30) == 200
                socks.append(sock)  # and never read on
        fifth = _tls(fleet, src="127.0.6.2")
        fifth.sendall(_head("GET", f"/v1/blob?sha256={sha}", f"authorization: {fakes[2].auth}\r\n"))
        assert _status(fifth, 10) == 429, "a download past the master's total was not refused"
        fifth.close()

        # the stalled readers are dropped after the send timeout, and their places come back
        def whole() -> bool:
            got = fakes[2].http.get("/v1/blob", params={"sha256": sha}, timeout=60)
            return got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha

        wait_for(whole, 60, "a full download once the stalled readers were dropped")
        for sock in socks:
            sock.close()
    finally:
        fleet.close()


# -- hole 8: schedule names in a handshake -------------------------------------------------------

def test_handshake_schedule_names_are_validated_capped_and_only_given_ones_cancelled(fl: Fleet) -> None:
    fake = FakeAgent(fl, "sched")
    resp = fake.handshake({f"s{i}": "0" * 16 for i in range(2000)})
    assert resp.status_code == 400 and "at most 256" in resp.json()["error"], resp.text
    resp = fake.handshake({"../../etc": "0" * 16})
    assert resp.status_code == 400 and "no schedule name" in resp.json()["error"], resp.text
    assert fake.handshake({}).status_code == 200
    with _api(fl) as api:
        resp = api.post("/api/v1/schedules", json={"name": "given-1", "cmd": "echo", "args": {}, "every": 3600,
                                                    "targets": {"uuids": [fake.uuid]}})
        assert resp.status_code == 200, resp.text
        assert api.delete("/api/v1/schedules/given-1").status_code == 200
    # back after the cancel: it reports the one it was given and names it never was
    resp = fake.handshake({"given-1": "0" * 16, "never-given": "0" * 16, "honest-sched": "0" * 16})
    assert resp.status_code == 200, resp.text
    cancelled = {m["p"]["args"]["name"] for m in fake.downlink(4.0)
                 if m["t"] == "task" and m["cmd"] == "zy.schedule.cancel"}
    assert cancelled == {"given-1"}


# -- hole 11: samples into series that are not the sender's --------------------------------------

def _sample(uuid: str, series: str, value: int) -> dict:
    now = time.time()
    day, ms = divmod(int(now * 1000), 86_400_000)
    return {"t": "sample", "uuid": uuid, "cmd": "echo", "taskid": f"sample:{series}:{day}", "seq": ms,
            "p": {"series": series, "time": now, "taken_at": now, "status": "ok", "fields": {"forged": value}}}


def test_samples_are_taken_only_for_schedules_the_master_gave_the_sender(fl: Fleet) -> None:
    fake = FakeAgent(fl, "samples")
    assert fake.handshake({}).status_code == 200
    with _api(fl) as api:
        for name, uuid in (("honest-load", fl.uuid_of("honest-1")), ("fake-own", fake.uuid)):
            resp = api.post("/api/v1/schedules", json={"name": name, "cmd": "echo", "args": {}, "every": 3600,
                                                        "targets": {"uuids": [uuid]}})
            assert resp.status_code == 200, resp.text
        rejected = api.get("/api/v1/status").json()["rejected"]
        resp = fake.send([_sample(fake.uuid, "honest-load", 1), _sample(fake.uuid, "invented", 2),
                          _sample(fake.uuid, "fake-own", 3)])
        assert resp.status_code == 200, resp.text
        wait_for(lambda: api.get("/api/v1/series/fake-own").json(), 20, "the sample of its own schedule")
        assert api.get("/api/v1/status").json()["rejected"] == rejected + 2
        for series in ("honest-load", "invented"):
            forged = [s for s in api.get(f"/api/v1/series/{series}").json() if s["uuid"] == fake.uuid]
            assert forged == [], f"a forged sample landed in series {series!r}"
        for name in ("honest-load", "fake-own"):
            api.delete(f"/api/v1/schedules/{name}")
