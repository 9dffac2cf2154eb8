"""The layout rules from DESIGN.md, checked: hcsdk imports no service, the agent stays lean,
and the SDK's public names are exactly its __all__."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hcsdk

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_hcsdk_imports_no_service() -> None:
    assert not _imports("hcsdk") & {"master", "proxy", "agent", "kernel_ext"}


def test_services_do_not_import_each_other() -> None:
    assert "master" not in _imports("agent")
    assert "agent" not in _imports("master")


def test_agent_loads_without_pandas_or_server_libraries() -> None:
    """What `zy agent` imports once enrolled: no SDK, server or enrollment-only libraries (the
    idle agent's 35 MiB depend on it: docs/performance.md)."""
    code = ("import sys; sys.argv = ['zy', 'agent']; import hcsdk.cli, agent.cli, agent.core, hcsdk.net.channel; "
            "bad = {'pandas', 'numpy', 'fastapi', 'granian', 'starlette', 'IPython', 'rich', 'pygments', 'click', "
            "'cryptography'} & {m.split('.')[0] for m in sys.modules}; "
            "print(', '.join(sorted(bad))); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"agent imports {result.stdout or result.stderr}"


def test_public_names_are_exactly_all() -> None:
    public = {name for name in vars(hcsdk) if not name.startswith("_")} - {"cli", "localfleet"}
    modules = {name for name in public if type(getattr(hcsdk, name)).__name__ == "module"}
    assert set(hcsdk.__all__) - {"__version__"} == public - modules
    for name in hcsdk.__all__:
        assert hasattr(hcsdk, name)
