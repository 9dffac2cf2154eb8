"""The channel options, declared once (hcsdk.net.settings), keep each command's flag names and
defaults as they were; the one reading of a client's credential (hcsdk.net.channel_server)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from hcsdk.net.channel_server import Credential, bearer
from hcsdk.net.settings import ChannelSettings, channel_options

#: each command's channel flags and their defaults, as the four CLIs declared them before issue 14
EXPECTED = {
    "master": {"http2": True, "heartbeat": 5.0, "dead_after": 15.0, "max_frame": 4 * 1024 * 1024,
               "idle_connection_grace": 45.0, "connections_per_address": 256},
    "proxy": {"http2": True, "heartbeat": 5.0, "dead_after": 12.0, "h2_retry": 60.0, "backoff_cap": 30.0,
              "idle_connection_grace": 45.0, "connections_per_address": 256},
    "agent": {"http2": True, "heartbeat": 5.0, "dead_after": 12.0, "h2_retry": 60.0, "backoff_cap": 30.0},
    "swarm": {"http2": True, "heartbeat": 5.0, "dead_after": 12.0},
}
MODULES = {"master": "master.cli", "proxy": "proxy.cli", "agent": "agent.cli", "swarm": "agent.swarm_cli"}


def _parse(command: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    importlib.import_module(MODULES[command]).register(parser.add_subparsers())
    return parser.parse_args([command, *(["--agents", "1"] if command == "swarm" else []), *argv])


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_each_command_keeps_its_channel_flags_and_defaults(command: str) -> None:
    assert channel_options(_parse(command)) == EXPECTED[command]
    flags = ["--no-http2", "--heartbeat", "1.5", "--dead-after", "4"]
    assert channel_options(_parse(command, *flags))["http2"] is False


def test_the_settings_classes_take_what_the_flags_give() -> None:
    from master.settings import MasterSettings
    from proxy.server import ProxySettings

    master = MasterSettings(data_dir=Path("."), **channel_options(_parse("master", "--dead-after", "20")))
    proxy = ProxySettings(data_dir=Path("."), **channel_options(_parse("proxy", "--h2-retry", "2")))
    assert master.dead_after == 20.0 and MasterSettings(data_dir=Path(".")).dead_after == 15.0
    assert proxy.h2_retry == 2.0 and isinstance(proxy, ChannelSettings)
    upstream = proxy.channel(http2=True, spread=False)
    assert type(upstream) is ChannelSettings and upstream.h2_retry == 2.0 and not upstream.spread


def _scope(authorization: str | None) -> dict[str, object]:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return {"headers": headers}


@pytest.mark.parametrize("header, expected", [
    ("Bearer u1:s3cret", "u1:s3cret"),
    ("bearer u1:s3cret", "u1:s3cret"),
    ("Bearer u1:", "u1:"),  # has the form; complete is False
    ("Bearer u1", None),
    ("Basic u1:s3cret", None),
    ("", None),
    (None, None),
])
def test_bearer_reads_uuid_colon_secret(header: str | None, expected: str | None) -> None:
    cred = bearer(_scope(header))
    assert (cred.text if cred else None) == expected


def test_a_credential_matches_only_its_own_digest() -> None:
    cred = Credential("u1:s3cret")
    assert cred.uuid == "u1" and cred.secret == "s3cret" and cred.complete
    assert cred.matches(cred.digest()) and not cred.matches(Credential("u1:other").digest())
    assert not cred.matches(b"") and not Credential("u1:").complete and not Credential(":x").complete
