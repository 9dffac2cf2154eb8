"""A real OpenSSH sshd for tests, with its own config, host key and authorized key."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"

CONFIG = """
Port {port}
ListenAddress {address}
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
ClientAliveInterval 5
LogLevel VERBOSE
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip() if path.suffix else Path(f"{path}.pub").read_text().strip()


class Sshd:
    """sshd on ``address`` (in the namespace ``wrap`` enters, if any)."""

    def __init__(self, root: Path, address: str = "127.0.0.1", wrap: list[str] | None = None):
        root.mkdir(parents=True)
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
        self.root = root
        self.port = free_port()
        host_pub = keygen(root / "host_key")
        client_pub = keygen(root / "client_key")
        (root / "authorized_keys").write_text(client_pub + "\n")
        self.client_key = root / "client_key"
        self.known_hosts = root / "known_hosts"
        self.address = address
        self.known_hosts.write_text(f"[{address}]:{self.port} {' '.join(host_pub.split()[:2])}\n")
        (root / "sshd_config").write_text(CONFIG.format(port=self.port, root=root, address=address))
        self.log = open(root / "sshd.log", "wb")  # closed in close()
        self.proc = subprocess.Popen([*(wrap or []), SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while b"Server listening" not in (root / "sshd.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("sshd did not start: " + (root / "sshd.log").read_text())
            time.sleep(0.1)

    def drop_sessions(self) -> None:
        """Cut every SSH connection (what a flaky link does); sshd itself keeps listening."""
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        for pid in children.split():
            os.kill(int(pid), signal.SIGKILL)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
