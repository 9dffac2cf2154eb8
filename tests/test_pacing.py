"""Reconnect storms paced by the server: the pacer's arithmetic (pure), the client's clamping of
what a server asks, and a real master under a swarm telling its refused agents when to return."""

from __future__ import annotations

import json
import math
import random
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet import Fleet
from hcsdk.localfleet import wait_for
from hcsdk.net.pacing import AdmissionPacer, busy_hint, paced_delay


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _measured(rate: float, seconds: float = 10.0, **kw: float) -> tuple[AdmissionPacer, Clock]:
    """A pacer that has seen ``rate`` completions a second for ``seconds``."""
    clock = Clock()
    pacer = AdmissionPacer(clock=clock, **kw)
    for _ in range(int(rate * seconds)):
        clock.now += 1 / rate
        pacer.completed()
    return pacer, clock


def test_the_rate_is_measured_from_completions() -> None:
    pacer, _ = _measured(200.0)
    assert pacer.rate() == pytest.approx(200.0, rel=0.1)
    pacer, _ = _measured(40.0)
    assert pacer.rate() == pytest.approx(40.0, rel=0.1)


def test_nothing_measured_uses_the_initial_rate_then_the_highest_seen() -> None:
    clock = Clock()
    pacer = AdmissionPacer(initial_rate=100.0, clock=clock)
    assert pacer.rate() == 100.0
    pacer, clock = _measured(250.0)
    clock.now += 60  # a quiet minute ends the measurement; the next storm starts from what was seen
    assert pacer.rate() == pytest.approx(250.0, rel=0.15)


def test_a_stalled_server_counts_as_the_floor_not_zero() -> None:
    pacer, clock = _measured(100.0, floor_rate=5.0, idle=1000.0)
    clock.now += 120  # nothing completes, yet the measurement is not over
    assert pacer.rate() == 5.0
    assert pacer.retry_after(0) == 0.5  # one admission (0.2 s) ahead, floored
    assert pacer.retry_after(10) == pytest.approx(10 / 5.0 + 1 / 5.0)


def test_n_refusals_are_spread_over_about_n_over_rate_seconds() -> None:
    pacer, _ = _measured(200.0, max_delay=600.0)
    waits = [pacer.retry_after(waiting=100) for _ in range(1000)]
    # the first comes back after the queue ahead (100 / 200 s) and one admission's time
    assert waits[0] == pytest.approx(100 / 200 + 1 / 200, rel=0.15)
    gaps = [b - a for a, b in zip(waits, waits[1:], strict=False)]
    assert all(g == pytest.approx(1 / pacer.rate()) for g in gaps)  # each a slot of its own
    assert waits[-1] - waits[0] == pytest.approx(999 / 200, rel=0.15)


def test_slots_that_have_passed_are_not_handed_out() -> None:
    pacer, clock = _measured(100.0, max_delay=600.0)
    first = pacer.retry_after(0)
    clock.now += 30  # long after that slot: the next one starts from now, not from the old one
    assert pacer.retry_after(0) == pytest.approx(first, rel=0.1)


def test_waits_are_floored_and_capped_and_slots_do_not_run_away() -> None:
    pacer, clock = _measured(1000.0, min_delay=0.5, max_delay=30.0)
    assert pacer.retry_after(0) == 0.5  # a fast server still does not invite a spin
    waits = [pacer.retry_after(10_000) for _ in range(100_000)]  # a flood of refusals
    assert max(waits) == 30.0
    clock.now += 31  # the slot was held at the cap, not pushed 100 s ahead
    assert pacer.retry_after(0) <= 1.0


def test_the_pacer_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="positive"):
        AdmissionPacer(initial_rate=0)
    with pytest.raises(ValueError, match="min_delay"):
        AdmissionPacer(min_delay=5, max_delay=1)


# -- the client's side ---------------------------------------------------------------------------

def test_busy_hint_reads_the_field_then_the_header_and_only_from_busy_refusals() -> None:
    busy = {"error": "busy", "kind": "busy"}
    assert busy_hint(503, {**busy, "retry_after": 3.25}, {"Retry-After": "9"}) == 3.25
    assert busy_hint(503, busy, {"Retry-After": "9"}) == 9.0
    assert busy_hint(429, {**busy, "retry_after": 1}, {}) == 1.0
    assert busy_hint(409, {**busy, "retry_after": 1}, {}) == 1.0
    assert busy_hint(503, busy, {}) is None  # an older master: no hint
    assert busy_hint(409, {"kind": "session", "retry_after": 1}, {}) is None  # not busy: handshake again
    assert busy_hint(500, {**busy, "retry_after": 1}, {}) is None
    assert busy_hint(503, "not an object", {"retry-after": "2"}) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "5", "soon", True, None, [3], {"s": 3}])
def test_an_unusable_retry_after_field_is_ignored(value: object) -> None:
    body = {"kind": "busy", "retry_after": value}
    assert busy_hint(503, body, {}) is None
    assert busy_hint(503, body, {"retry-after": "4"}) == 4.0  # the header still counts
    assert busy_hint(503, body, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert busy_hint(503, body, {"retry-after": "-3"}) is None


@pytest.mark.parametrize("asked", [1e12, 86_400.0, 30.0001, -5.0, 0.0, 1e-9, -1e300])
def test_a_client_clamps_what_a_buggy_server_asks(asked: float) -> None:
    rng = random.Random(7)
    for _ in range(200):
        delay = paced_delay(asked, floor=0.5, cap=30.0, rng=rng)
        assert 0.4 <= delay <= 30.0


def test_a_client_jitters_a_sane_wait_by_a_fifth() -> None:
    rng = random.Random(3)
    delays = [paced_delay(10.0, floor=0.5, cap=30.0, rng=rng) for _ in range(2000)]
    assert 8.0 <= min(delays) < 8.3 and 11.7 < max(delays) <= 12.0
    near_cap = [paced_delay(29.0, floor=0.5, cap=30.0, rng=rng) for _ in range(2000)]
    assert max(near_cap) <= 30.0 and sum(d == 30.0 for d in near_cap) == 0  # no pile at the cap


# -- a real master and swarm -----------------------------------------------------------------------

def _handshake_raw(fleet: Fleet, auth: str, extra: str = "") -> tuple[int, dict[str, str], dict[str, object]]:
    """One HTTP/1.1 handshake by hand (the client's own headers and body are what we choose)."""
    ctx = ssl.create_default_context(cafile=str(fleet.root / "master" / "ca.pem"))
    ctx.check_hostname = False
    body = b'{"facts": {}, "labels": {}, "retry_after": 0}'
    with socket.create_connection(("127.0.0.1", fleet.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(f"POST /v1/handshake HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\n{extra}"
                     f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
                     .encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(payload)


def test_a_clients_own_retry_after_changes_nothing_at_the_master(tmp_path: Path) -> None:
    """The master computes the wait; a refused client's Retry-After header or body field (zero,
    huge, nonsense) neither shortens its own wait nor moves anyone else's slot."""
    fleet = Fleet(tmp_path, ["--handshake-queue", "0"])
    fleet.start_master()
    try:
        auth = "Bearer not-a-uuid:nothing"  # refused before its credential is even looked up
        answers = [_handshake_raw(fleet, auth, f"retry-after: {v}\r\n") for v in ("0", "999999", "-1", "NaN")]
        for status, headers, body in answers:
            assert status == 503 and body["kind"] == "busy", body
            wait = body["retry_after"]
            assert isinstance(wait, float) and 0.5 <= wait <= 30.0
            assert headers["retry-after"] == str(max(1, math.ceil(wait)))
        assert fleet.client.status()["busy"] >= 4
    finally:
        fleet.close()


def test_a_storm_against_a_tiny_queue_is_paced_and_everyone_gets_in(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["--handshake-concurrency", "1", "--handshake-queue", "1"])
    fleet.start_master()
    try:
        swarm = fleet.start_swarm(50, name="st", extra=["--log-level", "info"])
        wait_for(lambda: fleet.online_count("st-") == 50, 180, "50 swarm agents online")
        assert fleet.client.status()["busy"] > 0
        paced = re.findall(r"master busy; retrying in ([0-9.]+) s \(as it asked\)", swarm.output())
        assert paced, swarm.output()[-3000:]
        assert all(0.0 < float(s) <= 30.0 for s in paced)
        assert "503" in swarm.output()
    finally:
        fleet.close()


def test_a_proxy_relays_the_masters_pacing_to_the_agents_behind_it(tmp_path: Path) -> None:
    """The master's busy answer crosses the proxy with its retry_after intact: the agents behind
    it sleep what the master asked, on the proxy's URL."""
    fleet = Fleet(tmp_path, ["--handshake-concurrency", "1", "--handshake-queue", "1"])
    fleet.start_master()
    try:
        url = fleet.start_proxy("edge")
        swarm = fleet.start_swarm(50, name="pf", urls=[url], extra=["--log-level", "info"])
        wait_for(lambda: fleet.online_count("pf-") == 50, 180, "50 agents online behind the proxy")
        relayed = re.findall(r"master busy; retrying in [0-9.]+ s \(as it asked\): (\S+) .*", swarm.output())
        assert relayed and set(relayed) == {url}, swarm.output()[-3000:]
        assert "503: the master is busy with reconnecting agents" in swarm.output()  # the master's own answer
        assert fleet.client.status()["busy"] > 0
    finally:
        fleet.close()


def test_a_second_handshake_of_one_uuid_is_told_to_come_back_shortly(tmp_path: Path) -> None:
    """409 "already in progress" is busy for a moment only: a short Retry-After, not a slot."""
    from test_trust_master import FakeAgent, _head, _tls

    fleet = Fleet(tmp_path)
    fleet.start_master()
    try:
        fake = FakeAgent(fleet, "twice")

        def second() -> httpx.Response | None:
            # the first handshake is still sending its body (each try opens a fresh one: the body
            # deadline ends a trickle after 5 s, and a loaded machine may be slower than that)
            with _tls(fleet, src="127.0.0.1") as sock:
                sock.sendall(_head("POST", "/v1/handshake",
                                   f"authorization: {fake.auth}\r\ncontent-length: 100\r\n") + b"{")
                time.sleep(0.2)
                resp = fake.handshake()
            return resp if resp.status_code == 409 else None

        resp = wait_for(second, 60, "the second handshake to be refused")
        assert resp.json()["kind"] == "busy" and resp.json()["retry_after"] == 1.0, resp.text
        assert resp.headers["retry-after"] == "1"
    finally:
        fleet.close()


def test_the_address_gate_tells_a_refused_address_when_to_come_back() -> None:
    import anyio

    from hcsdk.net.asgi import Receive, Scope, Send
    from hcsdk.net.limits import AddressGate

    answers: list[dict[str, Any]] = []
    release = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()  # holds its place, never authenticates

    async def send(msg: dict[str, Any]) -> None:
        answers.append(msg)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def main() -> None:
        gate = AddressGate(app, limit=1, total=1)
        scope: Scope = {"type": "http", "client": ("10.0.0.1", 5), "headers": []}
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate, dict(scope), receive, send)
            await anyio.sleep(0.01)
            await gate(dict(scope), receive, send)  # same address: 429
            await gate({**scope, "client": ("10.0.0.2", 5)}, receive, send)  # another, anonymous: the total, 503
            release.set()

    anyio.run(main)
    starts = [m for m in answers if m["type"] == "http.response.start"]
    bodies = [json.loads(m["body"]) for m in answers if m["type"] == "http.response.body"]
    assert [m["status"] for m in starts] == [429, 503]
    for start, body in zip(starts, bodies, strict=True):
        assert (b"retry-after", b"1") in start["headers"]
        assert body["kind"] == "busy" and body["retry_after"] == 1.0
