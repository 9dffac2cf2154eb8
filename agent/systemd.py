"""sd_notify for agents run by systemd (``Type=notify``, ``NotifyAccess=all``): READY once
connected, and MAINPID when a new build takes over in an online update, so systemd follows the
new process instead of stopping the service when the old one exits. Does nothing elsewhere."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True
