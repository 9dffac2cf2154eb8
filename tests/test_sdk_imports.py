"""What importing hcsdk costs: ``import hcsdk`` loads no SDK module until a name is used, the
services' rooms load no pandas or IPython, and hcsdk.net keeps httpx's command line (click,
rich, pygments) out of every service without looking at ``sys.argv``. Each check runs in a
fresh interpreter, since this one has imported everything already."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import hcsdk

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
        {_loaded(HEAVY)}
        print(sorted(m for m in sys.modules if m.startswith("hcsdk._")))
        """)
    assert out.splitlines() == ["[]", "[]"]


def test_hcsdk_net_keeps_httpx_command_line_out_whatever_argv_says() -> None:
    # argv of an ordinary script, not `zy agent`: the guard no longer depends on it
    out = _fresh(f"""
        import sys
        sys.argv = ["some-script.py"]
        import hcsdk.net
        import httpx
        httpx.AsyncClient
        {_loaded(("rich", "click", "pygments"))}
        """)
    assert out == "[]"


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
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno}: {n}" for n in names if n.startswith("hcsdk._")]
    assert not found, f"kernel_ext reaches into private SDK modules: {found}"
