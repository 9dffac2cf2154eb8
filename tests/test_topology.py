"""Real topologies in network namespaces: hosts that cannot reach the master at all."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from topology import Topology, available

from fleet import Fleet, wait_for

if not available():
    pytest.skip("network namespaces need root and iproute2", allow_module_level=True)


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology()
    try:
        yield t
    finally:
        t.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reachable(ns: str, host: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=2)"
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True).returncode == 0


def test_agent_with_no_route_to_the_master_works_through_a_proxy(topo: Topology, tmp_path: Path) -> None:
    """master (this machine) --10.231.1.0/24-- proxy host --10.231.2.0/24-- agent host"""
    proxy_ns, agent_ns = topo.host("proxy"), topo.host("agent")
    master_addr, proxy_up_addr = topo.link(None, proxy_ns)
    proxy_down_addr, _ = topo.link(proxy_ns, agent_ns)
    port = _free_port()
    fleet = Fleet(tmp_path, ["--advertise", f"https://{master_addr}:{port}", "--offline-grace", "5"])
    try:
        fleet.start_master(port, host="0.0.0.0")
        assert not _reachable(agent_ns, master_addr, port), "the agent's host must not reach the master"
        assert _reachable(proxy_ns, master_addr, port)
        edge = fleet.start_proxy("edge", upstreams=[f"https://{master_addr}:{port}"], host=proxy_down_addr,
                                 wrap=topo.wrap(proxy_ns))
        fleet.start_agent("island-1", extra=["--master", edge], wrap=topo.wrap(agent_ns))
        fleet.wait_online("island-1", "edge", timeout=60)
        inv = fleet.client.inventory().set_index("hostname")
        assert list(inv.loc["island-1", "via"]) == ["edge"]
        df = fleet.client.run("ip -brief addr | grep -c UP; echo from the island", targets="island-1",
                              timeout=30).to_dataframe()
        assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"].endswith("from the island\n")
    finally:
        fleet.close()


def test_ssh_downlink_into_a_site_that_accepts_only_inbound(topo: Topology, tmp_path: Path) -> None:
    """The proxy's host opens no connection out; the master logs in over SSH and forwards a port."""
    from sshd import Sshd, free_port

    proxy_ns, agent_ns = topo.host("inbound"), topo.host("agent")
    master_addr, proxy_addr = topo.link(None, proxy_ns)
    proxy_down_addr, _ = topo.link(proxy_ns, agent_ns)
    topo.inbound_only(proxy_ns)
    sshd = Sshd(tmp_path / "sshd", address=proxy_addr, wrap=topo.wrap(proxy_ns))
    port, remote_port = _free_port(), free_port()
    fleet = Fleet(tmp_path / "fleet", [
        "--advertise", f"https://{master_addr}:{port}", "--ssh-proxy", f"root@{proxy_addr}:{sshd.port}",
        "--ssh-key", str(sshd.client_key), "--ssh-known-hosts", str(sshd.known_hosts),
        "--ssh-remote-port", str(remote_port)])
    try:
        fleet.start_master(port, host="0.0.0.0")
        assert not _reachable(proxy_ns, master_addr, port), "the proxy's host must not open connections out"
        assert fleet.master is not None
        wait_for(lambda: "ssh downlink up" in fleet.master.output(), 30, "the ssh downlink")  # type: ignore[union-attr]
        edge = fleet.start_proxy("inbound", upstreams=[f"https://127.0.0.1:{remote_port}"], host=proxy_down_addr,
                                 wrap=topo.wrap(proxy_ns))
        fleet.start_agent("behind-1", extra=["--master", edge], wrap=topo.wrap(agent_ns))
        fleet.wait_online("behind-1", "inbound", timeout=60)
        df = fleet.client.run("echo reached over ssh", targets="behind-1", timeout=30).to_dataframe()
        assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "reached over ssh\n"
    finally:
        fleet.close()
        sshd.close()
