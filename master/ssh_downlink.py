"""The SSH downlink: for a site that accepts no outbound connection towards us, only inbound
SSH. The master logs in to the proxy's host and asks for a remote port forward, so that
``127.0.0.1:REMOTE_PORT`` on that host leads back to the master through the SSH connection;
the proxy there uses ``https://127.0.0.1:REMOTE_PORT`` as (one of) its upstream(s).

The host key must be known in advance (``--ssh-known-hosts``): no blind trust on first use.
A dropped connection is re-established with backoff, for as long as the master runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anyio

from hcsdk.common.backoff import Backoff

log = logging.getLogger("zy.master.ssh")


@dataclass(frozen=True, kw_only=True)
class SshTarget:
    user: str
    host: str
    port: int = 22
    remote_port: int = 8443

    @classmethod
    def parse(cls, text: str, remote_port: int) -> SshTarget:
        """``user@host[:port]``"""
        user, at, hostport = text.partition("@")
        host, colon, port = hostport.partition(":")
        if not at or not user or not host or (colon and not port.isdigit()):
            raise ValueError(f"--ssh-proxy wants USER@HOST[:PORT], got {text!r}")
        return cls(user=user, host=host, port=int(port) if colon else 22, remote_port=remote_port)


async def keep_tunnel(target: SshTarget, key: Path, known_hosts: Path, local_host: str, local_port: int,
                      backoff_cap: float = 30.0, keepalive: float = 10.0) -> None:
    """Hold the tunnel up for ever: connect, forward, wait for the connection to drop, repeat."""
    import asyncssh

    backoff = Backoff(1.0, backoff_cap)
    where = f"{target.user}@{target.host}:{target.port}"
    while True:
        try:
            async with asyncssh.connect(
                target.host, port=target.port, username=target.user, client_keys=[str(key)],
                known_hosts=str(known_hosts), keepalive_interval=keepalive, keepalive_count_max=3,
                agent_path=None,
            ) as conn:
                await conn.forward_remote_port("127.0.0.1", target.remote_port, local_host, local_port)
                log.warning("ssh downlink up: %s forwards 127.0.0.1:%d to this master", where, target.remote_port)
                print(f"zy master: ssh downlink up via {where} (remote 127.0.0.1:{target.remote_port})", flush=True)
                backoff.reset()
                await conn.wait_closed()
                log.warning("ssh downlink to %s closed", where)
        except (OSError, asyncssh.Error) as exc:
            log.warning("ssh downlink to %s failed: %s", where, exc)
        delay = backoff.next_delay()
        await anyio.sleep(delay)
