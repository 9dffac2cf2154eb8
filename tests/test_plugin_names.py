"""A plugin's name comes from the master's command and becomes a directory and a module name on
the agent, so it must match the one rule (hcsdk.protocol.names.PLUGIN_NAME) whole: with
``^...$`` and ``re.match`` a trailing newline slipped through. Attacked through a real agent, and
the rule itself on its own."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import Fleet
from hcsdk.protocol.names import is_plugin_name

PLUGIN = b"from agent.plugins.api import command\n@command('nl.x')\ndef x(ctx):\n    return None\n"
NEWLINES = ["x\n", "hello\n", "x\r\n", "x\nevil"]


@pytest.mark.parametrize("name", ["x", "hello", "a_1", "z" * 40])
def test_plugin_names(name: str) -> None:
    assert is_plugin_name(name)


@pytest.mark.parametrize("name", [*NEWLINES, "", "X", "1x", "_x", "x-y", "x.y", "../x", "z" * 41, None, 7])
def test_not_plugin_names(name: object) -> None:
    assert not is_plugin_name(name)


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("plugin-names"))
    fleet.start_master()
    fleet.start_agent("pn-1")
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def _plugin_dirs(fl: Fleet) -> list[str]:
    plugins = fl.root / "agents" / "pn-1" / "plugins"
    return sorted(p.name for p in plugins.iterdir()) if plugins.is_dir() else []


def _install(fl: Fleet, name: str) -> dict[str, object]:
    args = {"name": name, "kind": "py", "sha256": hashlib.sha256(PLUGIN).hexdigest(),
            "data": base64.b64encode(PLUGIN).decode()}
    return dict(fl.client.run(cmd="zy.plugin.install", args=args, targets="pn-1", timeout=30).to_dataframe().loc[0])


@pytest.mark.parametrize("name", NEWLINES)
def test_installing_a_plugin_named_with_a_newline_is_refused(fl: Fleet, name: str) -> None:
    row = _install(fl, name)
    assert row["status"] == "error" and "must be lowercase letters, digits and _" in str(row["error"])
    assert all("\n" not in d and "\r" not in d for d in _plugin_dirs(fl))  # nothing was written under it
    gone = fl.client.run(cmd="nl.x", args={}, targets="pn-1", timeout=30).to_dataframe()
    assert "unknown cmd 'nl.x'" in gone.loc[0, "error"]


def test_removing_a_plugin_named_with_a_newline_is_refused(fl: Fleet) -> None:
    assert _install(fl, "nl")["status"] == "ok"  # the control: the same bundle under a plugin name
    assert "nl" in _plugin_dirs(fl)
    df = fl.client.run(cmd="zy.plugin.remove", args={"name": "nl\n"}, targets="pn-1", timeout=30).to_dataframe()
    assert df.loc[0, "status"] == "error" and "must be lowercase letters, digits and _" in df.loc[0, "error"]
    assert "nl" in _plugin_dirs(fl)
    assert fl.client.run(cmd="nl.x", args={}, targets="pn-1", timeout=30).to_dataframe().loc[0, "status"] == "ok"


def test_the_sdk_refuses_to_bundle_a_file_named_with_a_newline(tmp_path: Path) -> None:
    from hcsdk._plugins import bundle
    from hcsdk.common.errors import UsageError

    path = tmp_path / "x\n.py"
    path.write_bytes(PLUGIN)
    with pytest.raises(UsageError, match="must be lowercase letters, digits and _"):
        bundle(path)
    control = tmp_path / "x.py"
    control.write_bytes(PLUGIN)
    assert bundle(control)[:2] == ("x", "py")
