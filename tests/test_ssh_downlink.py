"""The SSH downlink against a real OpenSSH sshd: the master logs in to the proxy's host and
forwards a port there back to itself; the proxy's only upstream is that port."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from requires import require
from sshd import SSHD, Sshd, free_port

from fleet import Fleet, wait_for

require(Path(SSHD).exists(), f"openssh-server is not installed: no {SSHD} (scripts/setup.sh installs it)")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.close()


def _master_with_downlink(fleet: Fleet, sshd: Sshd, known_hosts: Path) -> int:
    remote_port = free_port()
    fleet.master_args += ["--ssh-proxy", f"root@127.0.0.1:{sshd.port}", "--ssh-key", str(sshd.client_key),
                          "--ssh-known-hosts", str(known_hosts), "--ssh-remote-port", str(remote_port)]
    fleet.start_master()
    return remote_port


def test_proxy_reaches_the_master_only_through_the_ssh_downlink(tmp_path: Path, sshd: Sshd) -> None:
    fleet = Fleet(tmp_path / "fleet", ["--offline-grace", "10"])
    try:
        remote_port = _master_with_downlink(fleet, sshd, sshd.known_hosts)
        assert fleet.master is not None
        wait_for(lambda: "ssh downlink up" in fleet.master.output(), 30, "the ssh downlink")  # type: ignore[union-attr]
        edge = fleet.start_proxy("inbound-only", upstreams=[f"https://127.0.0.1:{remote_port}"])
        fleet.start_agent("site-1", extra=["--master", edge])
        fleet.wait_online("site-1")
        # Seen under heavy load: the agent reconnects once just after it first comes online
        # (not yet explained); wait until a ping gets through before the run under test.
        wait_for(lambda: fleet.client.run(cmd="ping", targets="site-1", timeout=10).to_dataframe().loc[0, "status"]
                 == "ok", 60, "a ping through the tunnel")
        df = fleet.client.run("echo over ssh", targets="site-1", timeout=30).to_dataframe()
        assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "over ssh\n", fleet.logs()

        sshd.drop_sessions()  # the SSH connection dies; the master dials again with backoff
        ups = lambda: len(re.findall("ssh downlink up", fleet.master.output()))  # type: ignore[union-attr] # noqa: E731
        wait_for(lambda: ups() >= 2, 60, "the ssh downlink to come back")
        fleet.wait_online("site-1", timeout=60)
        # the proxy's upstream came back, so its clients reconnect through it: "online" may still
        # be the session that is about to end; wait until a ping gets through, as above
        wait_for(lambda: fleet.client.run(cmd="ping", targets="site-1", timeout=10).to_dataframe().loc[0, "status"]
                 == "ok", 60, "a ping through the new tunnel")
        df = fleet.client.run("echo again", targets="site-1", timeout=30).to_dataframe()
        assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "again\n"

        # where a direct uplink exists too, the proxy prefers it and keeps the tunnel as fallback
        tunnel = f"https://127.0.0.1:{remote_port}"
        fleet.start_proxy("both-ways", upstreams=[fleet.url, tunnel])
        fleet.wait_online("both-ways")
        assert f"connected to {fleet.url}" in fleet.agents["both-ways"].output()
        assert f"connected to {tunnel}" not in fleet.agents["both-ways"].output()
    finally:
        fleet.close()


def test_an_unknown_host_key_is_refused(tmp_path: Path, sshd: Sshd) -> None:
    wrong = tmp_path / "wrong_known_hosts"
    other = Sshd(tmp_path / "other-sshd")  # a different host key for the same address
    try:
        wrong.write_text(other.known_hosts.read_text().replace(str(other.port), str(sshd.port)))
    finally:
        other.close()
    fleet = Fleet(tmp_path / "fleet")
    try:
        _master_with_downlink(fleet, sshd, wrong)
        assert fleet.master is not None
        wait_for(lambda: "ssh downlink to" in fleet.master.output() and "failed" in fleet.master.output(),  # type: ignore[union-attr]
                 30, "the master to refuse the host key")
        assert "ssh downlink up" not in fleet.master.output()
    finally:
        fleet.close()
