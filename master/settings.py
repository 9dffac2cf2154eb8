"""Master settings, with defaults chosen for long-lived agent channels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hcsdk.net.settings import ChannelSettings


@dataclass(kw_only=True)
class MasterSettings(ChannelSettings):
    """The channel's settings (heartbeat, idle beat, poll wait, max frame: see ChannelSettings)
    and the master's own."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    advertise: list[str] = field(default_factory=list)
    #: a channel silent this long is dead (under 30 s by default)
    dead_after: float = 15.0
    #: handshakes processed at once, and how many may wait before the rest get 503 (retry later)
    handshake_concurrency: int = 32
    handshake_queue: int = 512
    #: how long an agent may be gone before its open tasks end offline/error
    offline_grace: float = 15.0
    #: after a master restart, how long agents with open tasks have to come back (their
    #: reconnect backoff is capped at 30 s by default)
    startup_grace: float = 40.0
    #: slack after a task's timeout before the master stops waiting for its result
    result_grace: float = 30.0
    #: scheduled samples older than this are deleted (hourly)
    sample_retention_days: float = 30.0
    max_body: int = 16 * 1024 * 1024
    #: seconds a client has to send an HTTP/1 request head, and a request body (enrollment,
    #: handshake, API; a poll batch gets more for its size): slow senders hold nothing for long
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    #: requests one source address may have in flight before they authenticate (enrollments,
    #: refusals, requests whose credential is still being checked); 0 = no cap. Authenticated
    #: channels do not count, so a NAT or a proxy with thousands of agents behind it is fine.
    address_limit: int = 256
    #: blob downloads (release chunks, agent builds) one agent may have in flight (a release
    #: fetches 4 chunks at a time); a proxy, which fetches for everyone behind it, gets 8 times this
    downloads_per_credential: int = 8
    #: blob downloads in flight from everyone together: one join token enrolls as many
    #: credentials as it likes, and each stalled download holds a few MiB of send buffers
    downloads_total: int = 256
    #: seconds one 256 KiB piece of a download may take to leave (a reader that stops reading is
    #: dropped; 60 s is about 4 KiB/s, far below any link a release runs over)
    send_timeout: float = 60.0
    write_user_config: bool = True
    #: where the state lives: None for the SQLite file in data_dir (one master), or a
    #: postgresql:// URL that several masters share (issue 15)
    store_url: str | None = None
    #: the key the secrets kept in a shared store are encrypted under (CA keys, the e2e key, the
    #: admin token): made by the first master, copied by the operator to the others
    key_file: Path | None = None
    #: this master's id in the cluster (DATA_DIR/master.id, made once)
    master_id: str = ""
    #: how often a master says it is alive (and renews the singleton lease it holds), and how
    #: long it may be silent before the others count it dead and take its agents and jobs
    cluster_heartbeat: float = 2.0
    master_dead_after: float = 10.0
    #: how often a master looks for tasks of its agents that a lost wake-up left undispatched
    dispatch_sweep: float = 2.0
    #: SSH downlinks: (user@host[:port], remote port) pairs, with one key and known_hosts file
    ssh_proxies: list[str] = field(default_factory=list)
    ssh_key: Path | None = None
    ssh_known_hosts: Path | None = None
    ssh_remote_port: int = 8443
