"""Namespace pieces the test harness (tests/topology.py) does not have, for bench/release.py:
a switched LAN (a bridge in a namespace of its own, one veth per host), links created straight
between namespaces under names of our choosing, token-bucket shaping at any rate, IP forwarding,
routes, and each interface's byte counters.

Everything is attached to a ``Topology`` (its ``hosts`` and ``links`` lists), so its
``close()`` removes it. Nothing is created in this machine's own namespace besides the one link
the SDK uses (see ``root_link``), on a subnet the tests never use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from topology import Topology


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def in_ns(ns: str, *argv: str) -> str:
    return run("ip", "netns", "exec", ns, *argv)


def veth(ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
    """A veth pair created directly inside two namespaces (no name is ever taken in ours)."""
    run("ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b, "netns", ns_b)


def up(ns: str, dev: str, addr: str | None = None) -> None:
    if addr is not None:
        run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
    run("ip", "-n", ns, "link", "set", dev, "up")


def shape(ns: str, dev: str, mbit: float, latency_ms: int = 400) -> None:
    """A token bucket on the egress of ``dev``: what leaves through it goes at most ``mbit``.
    The burst is 2 ms at the rate, so a fast link is not held back by the timer, and never below
    64 KiB, one GSO packet off a veth (the harness's thin links use 32 kbit)."""
    burst = max(64 * 1024, int(mbit * 1e6 / 8 * 0.002))
    in_ns(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
          "burst", str(burst), "latency", f"{latency_ms}ms")


def forward(ns: str) -> None:
    in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def route(ns: str, dest: str, via: str) -> None:
    run("ip", "-n", ns, "route", "replace", dest, "via", via)


#: Ethernet 14 + IPv4 20 + TCP 20 + timestamps 12: the headers of each TCP packet on a veth
HEADERS = 66


def counters(ns: str, dev: str) -> dict[str, int]:
    """Bytes and packets each way through ``dev`` in ``ns``, headers included. A packet is
    counted as the kernel passes it: an MTU-sized one where a token bucket splits GSO packets
    (the thin link, with its 32 kbit burst), else often a GSO packet of up to 64 KiB with one
    set of headers. ``bytes - HEADERS * packets`` is the TCP payload either way."""
    stats = json.loads(run("ip", "-j", "-s", "-n", ns, "link", "show", "dev", dev))[0]["stats64"]
    return {f"{way}_{what}": int(stats[way][what]) for way in ("rx", "tx") for what in ("bytes", "packets")}


def root_link(topo: Topology, ns: str) -> tuple[str, str]:
    """This machine's namespace <-> ``ns``, for the SDK; returns (our address, ns's address).
    Its subnet (10.239.X.0/24, X from our pid) is not the harness's 10.231.N.0/24, so a test
    run at the same time cannot collide with it."""
    x = os.getpid() % 250 + 1
    ours, theirs = f"{topo.tag}r", "sdk0"
    run("ip", "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", ns)
    topo.links.append(ours)
    run("ip", "addr", "add", f"10.239.{x}.1/24", "dev", ours)
    run("ip", "link", "set", ours, "up")
    up(ns, theirs, f"10.239.{x}.2/24")
    return f"10.239.{x}.1", f"10.239.{x}.2"


class Lan:
    """A switch (a bridge in a namespace of its own) that hosts plug into with one veth each,
    on 10.232.1.0/24. With ``mbit`` every port is shaped both ways, so each host uploads and
    downloads at most that much (the switch side shapes what goes to the host)."""

    PREFIX = "10.232.1"

    def __init__(self, topo: Topology, mbit: float = 0) -> None:
        self.topo = topo
        self.mbit = mbit
        self.ns = topo.host("switch")
        run("ip", "-n", self.ns, "link", "add", "br0", "type", "bridge")
        up(self.ns, "br0")

    def plug(self, ns: str, index: int, dev: str = "lan0") -> str:
        """Connect ``ns`` as host ``index`` (1-254); returns its address."""
        port = f"p{index}"
        veth(ns, dev, self.ns, port)
        run("ip", "-n", self.ns, "link", "set", port, "master", "br0")
        up(self.ns, port)
        addr = f"{self.PREFIX}.{index}"
        up(ns, dev, f"{addr}/24")
        if self.mbit:
            shape(ns, dev, self.mbit, latency_ms=50)
            shape(self.ns, port, self.mbit, latency_ms=50)
        return addr
