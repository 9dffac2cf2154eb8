"""Real topologies in network namespaces: hosts that cannot reach the master at all."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from requires import require
from topology import Topology, available

from fleet import Fleet, wait_for

require(os.geteuid() == 0, "network namespaces need root (run the tests as root)")
require(shutil.which("ip") and shutil.which("iptables"),
        "network namespaces need iproute2 and iptables (scripts/setup.sh installs them)")
require(available(), "`ip netns add` failed: this kernel or container does not allow network namespaces")


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


def test_three_proxy_chain_across_hosts_over_a_thin_line(topo: Topology, tmp_path: Path) -> None:
    """agent (TH) -> proxy TH -> proxy SG -> proxy HK ==1 Mbit/s== master; every hop its own host."""
    hk, sg, th, site = topo.host("hk"), topo.host("sg"), topo.host("th"), topo.host("site")
    master_addr, _ = topo.link(None, hk)
    topo.thin(None, hk, "1mbit")
    hk_down, _ = topo.link(hk, sg)
    sg_down, _ = topo.link(sg, th)
    th_down, _ = topo.link(th, site)
    port = _free_port()
    fleet = Fleet(tmp_path, ["--advertise", f"https://{master_addr}:{port}"])
    try:
        fleet.start_master(port, host="0.0.0.0")
        p_hk = fleet.start_proxy("hk", upstreams=[f"https://{master_addr}:{port}"], host=hk_down, wrap=topo.wrap(hk))
        p_sg = fleet.start_proxy("sg", upstreams=[p_hk], host=sg_down, wrap=topo.wrap(sg))
        p_th = fleet.start_proxy("th", upstreams=[p_sg], host=th_down, wrap=topo.wrap(th))
        fleet.start_agent("far-1", extra=["--master", p_th], wrap=topo.wrap(site))
        fleet.wait_online("far-1", timeout=90)
        assert list(fleet.client.inventory().set_index("hostname").loc["far-1", "via"]) == ["hk", "sg", "th"]
        # 200 KB of output crosses the thin line intact
        df = fleet.client.run("head -c 150000 /dev/zero | base64", targets="far-1", timeout=120).to_dataframe()
        assert df.loc[0, "status"] == "ok" and len(df.loc[0, "stdout"].replace("\n", "")) == 200000
    finally:
        fleet.close()


def test_failover_between_two_proxy_hosts_mid_run(topo: Topology, tmp_path: Path) -> None:
    pa, pb, site = topo.host("pa"), topo.host("pb"), topo.host("site")
    master_a, _ = topo.link(None, pa)
    master_b, _ = topo.link(None, pb)
    pa_down, _ = topo.link(pa, site)
    pb_down, _ = topo.link(pb, site)
    port = _free_port()
    fleet = Fleet(tmp_path, ["--advertise", f"https://{master_a}:{port}", "--advertise", f"https://{master_b}:{port}",
                             "--offline-grace", "20"])
    try:
        fleet.start_master(port, host="0.0.0.0")
        urls = {name: fleet.start_proxy(name, upstreams=[f"https://{up}:{port}"], host=down, wrap=topo.wrap(ns))
                for name, up, down, ns in (("pa", master_a, pa_down, pa), ("pb", master_b, pb_down, pb))}
        fleet.start_agent("fo-1", extra=["--master", urls["pa"], "--master", urls["pb"]], wrap=topo.wrap(site))
        fleet.wait_online("fo-1", "pa", "pb", timeout=60)
        first = list(fleet.client.inventory().set_index("hostname").loc["fo-1", "via"])[0]
        run = fleet.client.run("sleep 2; echo survived", targets="fo-1", timeout=120)
        fleet.agents[first].kill()  # the proxy host's relay dies mid-run
        df = run.to_dataframe()
        assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "survived\n", (df.loc[0, "error"], fleet.logs())
    finally:
        fleet.close()


def test_master_restart_with_twenty_agents_behind_a_proxy_host(topo: Topology, tmp_path: Path) -> None:
    edge_ns, site = topo.host("edge"), topo.host("site")
    master_addr, _ = topo.link(None, edge_ns)
    edge_down, _ = topo.link(edge_ns, site)
    port = _free_port()
    fleet = Fleet(tmp_path, ["--advertise", f"https://{master_addr}:{port}"])
    try:
        fleet.start_master(port, host="0.0.0.0")
        edge = fleet.start_proxy("edge", upstreams=[f"https://{master_addr}:{port}"], host=edge_down,
                                 wrap=topo.wrap(edge_ns))
        names = [f"n-{i:02d}" for i in range(20)]
        for name in names:
            fleet.start_agent(name, extra=["--master", edge], wrap=topo.wrap(site))
        fleet.wait_online(*names, timeout=120)
        run = fleet.client.run("sleep 2; echo kept", targets="n-*", timeout=120)
        fleet.restart_master(kill=True)  # reconnects spread by jitter; results come from the spools
        df = run.to_dataframe()
        assert len(df) == 20 and (df["status"] == "ok").all() and (df["stdout"] == "kept\n").all(), \
            df[["hostname", "status", "error"]].to_string()
        fleet.wait_online(*names, timeout=120)
    finally:
        fleet.close()
