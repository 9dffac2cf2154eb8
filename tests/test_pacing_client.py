"""The channel's client against scripted servers (real TLS sockets on loopback, the real
``Channel``): it obeys a busy server's wait on the same URL, clamps a nonsense wait to its
backoff cap, and walks past URLs that give no HTTP answer without backing off."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from hcsdk.net.channel import Channel, ChannelSettings
from hcsdk.net.tls import issue_server_cert, make_ca

CA_CERT, CA_KEY = make_ca("pacing test CA")


class Scripted:
    """An HTTP/1.1-only TLS server answering every request with ``answer()`` (status, body,
    headers), counting the requests it got."""

    def __init__(self, tmp: Path, answer: Callable[[], tuple[int, Any, dict[str, str]]]) -> None:
        cert, key = issue_server_cert(CA_CERT, CA_KEY, ["127.0.0.1"])
        (tmp / "c.pem").write_bytes(cert)
        (tmp / "k.pem").write_bytes(key)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
        self._ctx.set_alpn_protocols(["http/1.1"])
        self.answer = answer
        self.requests = 0
        self.got = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        try:
            with self._ctx.wrap_socket(raw, server_side=True) as conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                if data.startswith(b"PRI * HTTP/2.0"):
                    return  # the channel's HTTP/2 attempt (ALPN said http/1.1): not a request
                head, _, got = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                while len(got) < length:  # read it all: closing on unread data resets the connection
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    got += chunk
                self.requests += 1
                self.got.set()
                status, body, headers = self.answer()
                payload = body if isinstance(body, bytes) else json.dumps(body).encode()
                extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                conn.sendall(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: "
                             f"{len(payload)}\r\nconnection: close\r\n{extra}\r\n".encode() + payload)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self._sock.close()


def _dead_url() -> str:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    return f"https://127.0.0.1:{port}"


def _channel(urls: list[str], cap: float = 2.0) -> Channel:
    event = anyio.Event()
    return Channel("u" * 16, "secret", urls, CA_CERT, facts=dict, labels={}, outbox=lambda _last: [],
                   on_message=lambda _m: None, wake=lambda: event,
                   settings=ChannelSettings(backoff_base=0.5, backoff_cap=cap, spread=False))


def _run_until(channel: Channel, done: Callable[[], bool], limit: float = 60.0) -> None:
    async def main() -> None:
        with anyio.fail_after(limit):
            async with anyio.create_task_group() as tg:
                tg.start_soon(channel.run_forever)
                while True:  # what we wait for happens in the servers' threads: look now and then
                    if done():
                        break
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()

    anyio.run(main)


def _busy(retry_after: Any) -> Callable[[], tuple[int, Any, dict[str, str]]]:
    return lambda: (503, {"error": "busy here", "kind": "busy", "retry_after": retry_after}, {})


@pytest.mark.parametrize("asked", [1e9, 86_400, 31, -5, 0])
def test_a_busy_server_is_obeyed_on_the_same_url_within_the_backoff_cap(tmp_path: Path, asked: float,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    busy, other = Scripted(tmp_path, _busy(asked)), Scripted(tmp_path, _busy(1))
    caplog.set_level(logging.INFO, "zy.channel")
    try:
        _run_until(_channel([busy.url, other.url]), lambda: busy.requests >= 3)
    finally:
        busy.close()
        other.close()
    assert other.requests == 0  # the busy server is alive: no rotation to the next URL
    waits = [float(str(r.getMessage().split()[4])) for r in caplog.records
             if r.getMessage().startswith("master busy; retrying in")]
    assert len(waits) >= 2 and all(0.3 < w <= 2.0 for w in waits), waits
    assert not any("reconnecting in" in r.getMessage() for r in caplog.records)  # no backoff escalation


@pytest.mark.parametrize("asked", [float("nan"), "soon", None, [5]])
def test_a_busy_answer_without_a_usable_wait_backs_off_to_the_next_url(tmp_path: Path, asked: Any,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    body = {"error": "busy here", "kind": "busy", "retry_after": asked}
    raw = json.dumps(body, allow_nan=True).encode()
    busy, other = Scripted(tmp_path, lambda: (503, raw, {})), Scripted(tmp_path, _busy(1))
    caplog.set_level(logging.INFO, "zy.channel")
    try:
        _run_until(_channel([busy.url, other.url]), lambda: other.requests >= 1)
    finally:
        busy.close()
        other.close()
    assert busy.requests == 1
    assert any("reconnecting in" in r.getMessage() for r in caplog.records)  # as before: backoff, next URL


def test_urls_that_give_no_answer_are_passed_at_once_and_a_round_backs_off(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    live = Scripted(tmp_path, _busy(1))
    caplog.set_level(logging.INFO, "zy.channel")
    seen: list[int] = []

    def reached() -> bool:
        if live.requests and not seen:  # how many backoff sleeps happened before the live URL answered
            seen.append(sum("reconnecting in" in r.getMessage() for r in caplog.records))
        return bool(seen)

    try:
        _run_until(_channel([_dead_url(), _dead_url(), live.url]), reached)
    finally:
        live.close()
    assert seen == [0], caplog.text  # two refused URLs, then the third, with no sleep between
    # a whole round of dead URLs backs off once per round, not once per URL
    caplog.clear()
    dead = [_dead_url(), _dead_url(), _dead_url()]
    rounds = 0

    def three_rounds() -> bool:
        nonlocal rounds
        rounds = sum("reconnecting in" in r.getMessage() for r in caplog.records)
        return rounds >= 2

    _run_until(_channel(dead, cap=0.5), three_rounds)
    ended = sum("ended:" in r.getMessage() for r in caplog.records)
    assert ended >= 3 * rounds, caplog.text
