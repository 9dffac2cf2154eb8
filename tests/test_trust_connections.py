"""Attack on a real master (issue 13, hole 5, per-address connections): connections that complete
TLS (ALPN h2 or http/1.1) and then send nothing. granian closes raw TCP that sends nothing
(its header timeout) but holds these forever, ~10 KiB and one fd each; the master's connection
reaper (hcsdk.net.reaper) closes them once no request authenticated on them within
``--idle-connection-grace``. Authenticated connections (the honest agent's h2 channel, the
SDK's) are never cut. Fails without the reaper: the idle connections stay open.

The attacker connects from 127.0.0.2, the honest agent and the SDK from 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import psutil
import pytest

from fleet import Fleet, wait_for

GRACE = 3
IDLE = 30


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("conns"), ["--idle-connection-grace", str(GRACE)])
    fleet.start_master()
    fleet.start_agent("honest-1")
    try:
        fleet.wait_online("honest-1")
        yield fleet
    finally:
        fleet.close()


def _idle_tls(port: int, alpn: str) -> ssl.SSLSocket:
    """A connection that completes the TLS handshake, then sends nothing (not even the h2
    preface); the attacker does not care whose certificate it is."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
    sock = ctx.wrap_socket(raw, server_hostname="master")
    assert sock.selected_alpn_protocol() == alpn
    return sock


def _closed_by_peer(sock: ssl.SSLSocket, deadline: float) -> bool:
    """Read (and drop whatever the server sends, e.g. h2 SETTINGS) until the server closes the
    connection; False if it is still open at ``deadline``."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(min(left, 1.0))
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            return True  # reset, or TLS torn down: closed
    return False


def assert_all_closed_by_peer(idle: list[ssl.SSLSocket], grace: float) -> None:
    """Every idle connection is closed by the server within 30 s (past ``grace``); closes them all."""
    deadline = time.monotonic() + 30
    still_open = [i for i, sock in enumerate(idle) if not _closed_by_peer(sock, deadline)]
    for sock in idle:
        sock.close()
    assert not still_open, f"idle TLS connections {still_open} still open after {grace} s grace + 30 s"


def _fds(fl: Fleet) -> int:
    assert fl.master is not None
    return int(psutil.Process(fl.master.popen.pid).num_fds())


def _connects(fl: Fleet) -> int:
    inv = fl.client.inventory()
    return int(inv.loc[inv["hostname"] == "honest-1", "connects"].iloc[0])


def test_idle_tls_connections_are_closed_and_honest_channels_are_not(fl: Fleet) -> None:
    connects = _connects(fl)
    started = time.monotonic()
    before = _fds(fl)
    idle = [_idle_tls(fl.port, "h2" if i % 2 else "http/1.1") for i in range(IDLE)]
    held = wait_for(lambda: (n := _fds(fl) - before) >= IDLE // 2 and n, 10, "the master to hold the connections")
    print(f"master fds: {before} before, +{held} with {IDLE} idle TLS connections")

    # during the attack the honest agent stays online and runs work
    assert "honest-1" in fl.online()
    df = fl.client.run("echo fine", targets="honest-1", timeout=30).to_dataframe()
    assert list(df["status"]) == ["ok"]

    assert_all_closed_by_peer(idle, GRACE)
    after = wait_for(lambda: (n := _fds(fl)) <= before + 5 and n, 10, "the master to release the fds")
    print(f"master fds after the reaper: {after} ({after - before:+d} against before)")

    # the honest agent's h2 channel was never cut: no reconnect for at least 10 s
    time.sleep(max(0.0, started + 10 - time.monotonic()))
    assert _connects(fl) == connects
    assert "honest-1" in fl.online()
