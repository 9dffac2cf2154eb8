"""What an agent reports about its host at every handshake. Standard library only."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from hcsdk.common.version import __version__


def _os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                key, sep, value = line.strip().partition("=")
                if sep:
                    out[key] = value.strip('"')
    except OSError:
        pass
    return out


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _ip_addresses() -> list[str]:
    addrs: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as fh:
            lines = fh.read().splitlines()
        for prev, line in zip(lines, lines[1:], strict=False):
            if "/32 host LOCAL" in line:
                addrs.add(prev.split()[-1])
    except OSError:
        try:
            addrs.update(str(i[4][0]) for i in socket.getaddrinfo(socket.gethostname(), None))
        except OSError:
            pass
    return sorted(a for a in addrs if not a.startswith("127."))


def collect(hostname: str | None = None) -> dict[str, Any]:
    rel = _os_release()
    uname = platform.uname()
    return {
        "hostname": hostname or socket.gethostname(),
        "os": rel.get("PRETTY_NAME") or f"{uname.system} {uname.release}",
        "os_id": rel.get("ID", uname.system.lower()),
        "os_version": rel.get("VERSION_ID", ""),
        "kernel": uname.release,
        "arch": uname.machine,
        "cpus": os.cpu_count(),
        "mem_total": _mem_total(),
        "ips": _ip_addresses(),
        "python": platform.python_version(),
        "agent_version": __version__,
    }
