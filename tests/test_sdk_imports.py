"""What importing hcsdk costs: ``import hcsdk`` loads no SDK module until a name is used, the
services' rooms load no pandas or IPython, and the services (not hcsdk, which SDK users import)
keep httpx's command line (click, rich, pygments) out of their processes. Each check runs in a
fresh interpreter, since this one has imported everything already."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import hcsdk

#: the SDK's display stack, then httpx's command line (which only the services keep out: see below)
HEAVY = ("pandas", "numpy", "IPython", "ipywidgets", "rich", "click", "pygments")


def _fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _loaded(names: tuple[str, ...]) -> str:
    return f"print(sorted({{m.split('.')[0] for m, mod in sys.modules.items() if mod is not None}} & {set(names)!r}))"


def test_import_hcsdk_loads_no_sdk_module() -> None:
    out = _fresh(f"""
        import sys, hcsdk
        print(sorted(m for m in sys.modules if m.startswith("hcsdk._")))
        {_loaded(("httpx", *HEAVY))}
        """)
    assert out.splitlines() == ["[]", "[]"]


def test_the_services_rooms_load_no_pandas_or_ipython() -> None:
    out = _fresh(f"""
        import sys
        import hcsdk.protocol, hcsdk.common, hcsdk.net.channel, hcsdk.net.enroll
        {_loaded(HEAVY[:4])}
        print(sorted(m for m in sys.modules if m.startswith("hcsdk._")))
        """)
    assert out.splitlines() == ["[]", "[]"]


def test_an_sdk_process_keeps_httpx_command_line() -> None:
    # a notebook or script using the SDK (which loads hcsdk.net) can still run httpx's CLI
    out = _fresh("""
        import sys
        import hcsdk.net.http, hcsdk.net.channel
        from hcsdk import Client
        import httpx, httpx._main
        print(httpx.main is httpx._main.main, sys.modules["httpx._main"] is not None)
        """)
    assert out == "True True"


def test_the_services_keep_httpx_command_line_out() -> None:
    # each way a service starts: `zy agent|proxy|swarm` (hcsdk.cli loads the entry points, then
    # the command imports the rest), `python -m agent`, and the proxy's own modules
    starts = {
        "zy agent": "from hcsdk.cli import _parser; _parser(); import agent.core",
        "zy swarm": "from hcsdk.cli import _parser; _parser(); import agent.swarm",
        "zy proxy": "from hcsdk.cli import _parser; _parser(); import proxy.server",
        "python -m agent": "import agent.__main__, agent.core",
        "proxy": "import proxy.server",
    }
    for name, start in starts.items():
        out = _fresh(f"""
            import sys
            {start}
            import hcsdk.net.channel, httpx
            httpx.AsyncClient
            {_loaded(("rich", "click", "pygments"))}
            """)
        assert out == "[]", f"{name} loads {out}"


def test_the_lazy_names_are_all_and_load_on_use() -> None:
    assert set(hcsdk.__all__) == set(hcsdk._WHERE)
    assert set(hcsdk.__all__) <= set(dir(hcsdk))
    out = _fresh("""
        import sys
        from hcsdk import Client, UsageError
        print(Client.__module__, UsageError.__mro__[1].__name__, "pandas" in sys.modules)
        """)
    assert out == "hcsdk._client ZyError False"


def test_kernel_ext_uses_only_the_public_sdk() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = []
    for path in sorted((root / "kernel_ext").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{path.name}:{node.lineno}: {n}" for n in names if n.startswith("hcsdk._")]
    assert not found, f"kernel_ext reaches into private SDK modules: {found}"
