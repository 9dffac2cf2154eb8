"""Attack on a real proxy (issue 13, hole 5, now on the proxy too): connections that complete TLS
(ALPN h2 or http/1.1) and then send nothing. The proxy runs the master's connection reaper
(hcsdk.net.reaper): it closes them once no request authenticated on them within
``--idle-connection-grace``, and never cuts the honest agent's channel (authenticated by the
session the master accepted) nor its own upstream channel (outbound). Fails without the reaper:
the idle connections stay open.

The attacker connects from 127.0.0.2, the honest agent from 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import psutil
import pytest
from test_trust_connections import _idle_tls, assert_all_closed_by_peer

from fleet import Fleet, wait_for

GRACE = 3
IDLE = 20


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("proxy-conns"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    try:
        url = fleet.start_proxy("edge", extra=["--idle-connection-grace", str(GRACE)])
        fleet.start_agent("behind-1", extra=["--master", url])
        fleet.wait_online("behind-1", "edge")
        fleet.proxy_port = urlsplit(url).port  # type: ignore[attr-defined]
        yield fleet
    finally:
        fleet.close()


def _fds(fl: Fleet) -> int:
    return int(psutil.Process(fl.agents["edge"].popen.pid).num_fds())


def _connects(fl: Fleet, name: str) -> int:
    inv = fl.client.inventory()
    return int(inv.loc[inv["hostname"] == name, "connects"].iloc[0])


def test_idle_tls_connections_to_a_proxy_are_closed_and_channels_are_not(fl: Fleet) -> None:
    port = fl.proxy_port  # type: ignore[attr-defined]
    connects = {name: _connects(fl, name) for name in ("behind-1", "edge")}
    started = time.monotonic()
    before = _fds(fl)
    idle = [_idle_tls(port, "h2" if i % 2 else "http/1.1") for i in range(IDLE)]
    held = wait_for(lambda: (n := _fds(fl) - before) >= IDLE // 2 and n, 10, "the proxy to hold the connections")
    print(f"proxy fds: {before} before, +{held} with {IDLE} idle TLS connections")

    df = fl.client.run("echo fine", targets="behind-1", timeout=30).to_dataframe()
    assert list(df["status"]) == ["ok"]

    assert_all_closed_by_peer(idle, GRACE)
    wait_for(lambda: _fds(fl) <= before + 5, 10, "the proxy to release the fds")

    # neither the agent's channel to the proxy nor the proxy's upstream was cut
    time.sleep(max(0.0, started + 10 - time.monotonic()))
    assert {name: _connects(fl, name) for name in connects} == connects
    assert {"behind-1", "edge"} <= fl.online()
