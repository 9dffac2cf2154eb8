"""Test hosts as network namespaces: veth links, no routing between links unless asked, so a
host only reaches its direct neighbours. Everything is removed on close, even after a failure."""

from __future__ import annotations

import itertools
import os
import subprocess

_ids = itertools.count(1)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def available() -> bool:
    if os.geteuid() != 0:
        return False
    probe = f"zyprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


class Topology:
    def __init__(self) -> None:
        self.tag = f"zy{os.getpid() % 10000}x{next(_ids)}"
        self.hosts: list[str] = []
        self.links: list[str] = []
        self._subnet = itertools.count(1)
        self._devs: dict[tuple[str | None, str], tuple[str, str]] = {}

    def host(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.hosts.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, a: str | None, b: str) -> tuple[str, str]:
        """A veth pair between ``a`` (None: this machine's own namespace) and ``b``; returns
        their addresses on a /24 of their own."""
        n = next(self._subnet)
        left, right = f"{self.tag}a{n}", f"{self.tag}b{n}"
        _ip("link", "add", left, "type", "veth", "peer", "name", right)
        self.links.append(left)
        self._devs[(a, b)] = (left, right)
        addr_a, addr_b = f"10.231.{n}.1", f"10.231.{n}.2"
        if a is not None:
            _ip("link", "set", left, "netns", a)
        _ip("link", "set", right, "netns", b)
        pre_a = ["-n", a] if a is not None else []
        _ip(*pre_a, "addr", "add", f"{addr_a}/24", "dev", left)
        _ip(*pre_a, "link", "set", left, "up")
        _ip("-n", b, "addr", "add", f"{addr_b}/24", "dev", right)
        _ip("-n", b, "link", "set", right, "up")
        return addr_a, addr_b

    def thin(self, a: str | None, b: str, rate: str = "1mbit") -> None:
        """Make the link between ``a`` and ``b`` thin both ways (a token bucket, as a small
        overseas line is)."""
        left, right = self._devs[(a, b)]
        for ns, dev in ((a, left), (b, right)):
            pre = ["ip", "netns", "exec", ns] if ns is not None else []
            subprocess.run([*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit",
                            "latency", "400ms"], check=True, capture_output=True)

    @staticmethod
    def inbound_only(ns: str) -> None:
        """The host may answer connections made to it, but open none itself (besides loopback)."""
        for rule in (["-o", "lo", "-j", "ACCEPT"],
                     ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-j", "REJECT"]):
            subprocess.run(["ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", *rule], check=True,
                           capture_output=True)

    @staticmethod
    def wrap(ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        for ns in self.hosts:
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:  # a link in this namespace outlives the other end's namespace
            subprocess.run(["ip", "link", "del", link], capture_output=True)
