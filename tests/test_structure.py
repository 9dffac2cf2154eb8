"""The layout rules from DESIGN.md and docs/architecture.md, checked from the source (AST only, no
processes except two import probes): hcsdk imports no service and the services none of each other,
the agent stays lean, the SDK's public names are exactly its __all__, envelopes are built only in the
protocol core, the master's SQL lives only in master/store/, hcsdk's shared room (protocol, common,
net) imports no SDK module, and the services import no private SDK module. A failure names each
offending file:line."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import hcsdk

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hcsdk", "master", "agent", "proxy", "kernel_ext")
SERVICES = ("master", "proxy", "agent")
SHARED_ROOM = ("hcsdk/protocol", "hcsdk/common", "hcsdk/net")
# the SDK's own modules: hcsdk._client, hcsdk._run, ..., the `zy` command line, the test harness
PRIVATE_SDK = re.compile(r"^hcsdk\.(_[a-z0-9]\w*|cli\w*|localfleet)(\.|$)")
HEAVY = ("httpx", "pandas", "IPython")


def _files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _under(path: Path, folder: str) -> bool:
    return _rel(path).startswith(folder.rstrip("/") + "/")


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> str:
    module = _module_of(path)
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in the file, relative ones made absolute. ``from a import b``
    yields a and a.b (b may be a submodule), so a rule on a module also sees it imported by name."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(path).split(".")
                anchor = ".".join(package[: len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _top_imports(package: str) -> set[str]:
    return {name.split(".")[0] for path in _files(package) for _, name in _imports(path)}


def _report(found: list[str], rule: str) -> str:
    return f"{rule}:\n  " + "\n  ".join(dict.fromkeys(found))


def _import_sites(paths: Iterator[Path], bad: Callable[[str], bool]) -> list[str]:
    """file:line: imports NAME, once per import statement (its first offending name)."""
    found: dict[tuple[str, int], str] = {}
    for path in paths:
        for lineno, name in _imports(path):
            if bad(name):
                found.setdefault((_rel(path), lineno), name)
    return [f"{rel}:{lineno}: imports {name}" for (rel, lineno), name in found.items()]


# -- the existing layout rules --------------------------------------------------------------------

def test_hcsdk_imports_no_service() -> None:
    assert not _top_imports("hcsdk") & {"master", "proxy", "agent", "kernel_ext"}


def test_services_do_not_import_each_other() -> None:
    for service in SERVICES:
        others = set(SERVICES) - {service}
        assert not _top_imports(service) & others, f"{service} imports {sorted(_top_imports(service) & others)}"
    assert not _top_imports("kernel_ext") & set(SERVICES), "kernel_ext imports a service (it drives the SDK)"


def test_agent_loads_without_pandas_or_server_libraries() -> None:
    """What `zy agent` imports once enrolled: no SDK, server or enrollment-only libraries (the
    idle agent's 35 MiB depend on it: docs/performance.md)."""
    # hcsdk.cli._parser() registers every package's command (master's actions too), as `zy agent` does
    code = ("import sys; sys.argv = ['zy', 'agent']; import hcsdk.cli, agent.cli, agent.core, hcsdk.net.channel; "
            "hcsdk.cli._parser(); "
            "bad = {'pandas', 'numpy', 'fastapi', 'granian', 'starlette', 'IPython', 'rich', 'pygments', 'click', "
            "'cryptography', 'psycopg', 'psycopg_pool'} & {m.split('.')[0] for m in sys.modules}; "
            "print(', '.join(sorted(bad))); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"agent imports {result.stdout or result.stderr}"


def test_public_names_are_exactly_all() -> None:
    # every name loads (hcsdk/__init__ imports the SDK lazily), then dir() lists what is there
    missing = [name for name in hcsdk.__all__ if not hasattr(hcsdk, name)]
    assert not missing, f"hcsdk.__all__ names what hcsdk lacks: {missing}"
    public = {name for name in dir(hcsdk) if not name.startswith("_")} - {"cli", "localfleet"}
    modules = {name for name in public if type(getattr(hcsdk, name)).__name__ == "module"}
    assert set(hcsdk.__all__) - {"__version__"} == public - modules


# -- envelopes are built by the protocol core only ----------------------------------------------

ENVELOPE_FIELDS = {"uuid", "cmd", "taskid", "seq"}


def _literal_keys(node: ast.expr) -> set[str] | None:
    """The string keys of a dict display or of a ``dict(k=...)`` call; None for anything else."""
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {k.arg for k in node.keywords if k.arg}
    return None


def _is_envelope(keys: set[str]) -> bool:
    # an envelope is {"t", "uuid", "cmd", "taskid", "seq", "p", "m"}: its type tag with any header
    # field, or the whole header; a stored event row (taskid, uuid, seq, kind, ...) is neither
    return ("t" in keys and bool(keys & ENVELOPE_FIELDS)) or ENVELOPE_FIELDS <= keys


def test_no_envelope_literal_outside_the_protocol_core() -> None:
    found = [f"{_rel(path)}:{node.lineno}: {{{', '.join(sorted(keys))}}}"
             for path in _files(*PACKAGES) if not _under(path, "hcsdk/protocol")
             for node in ast.walk(_tree(path)) if isinstance(node, ast.expr)
             if (keys := _literal_keys(node)) is not None and _is_envelope(keys)]
    assert not found, _report(found, "envelope dict literals outside hcsdk/protocol/ (build a message class "
                                     "from hcsdk.protocol.messages and call .to_wire()/.encode())")


def _payload_reads(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, code) of each read of an envelope's payload by its wire key: ``x["p"]`` and
    ``x.get("p")`` / ``.pop("p")`` / ``.setdefault("p")``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "p":
            yield node.lineno, '["p"]'
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault") and node.args
              and isinstance(node.args[0], ast.Constant) and node.args[0].value == "p"):
            yield node.lineno, f'.{node.func.attr}("p")'


def test_the_master_reads_no_envelope_payload_by_hand() -> None:
    """The master is a thin adapter: it parses each uplink envelope once (hcsdk.protocol.messages
    .parse) and reads the message's typed fields; only the core knows the payload's wire key."""
    found = [f"{_rel(path)}:{lineno}: {code}" for path in _files("master", "proxy", "agent", "hcsdk/net")
             for lineno, code in sorted(_payload_reads(_tree(path)))]
    assert not found, _report(found, "envelope payloads read by hand outside the core (parse the envelope with "
                                     "hcsdk.protocol.messages.parse and read the message's fields)")
    # the rule sees what the master did before it parsed once (master/channel.py, master/ingest.py,
    # master/schedules.py, master/store/sqlite_runs.py)
    before = ('cache = msg["p"]["cache"]\nseries = msg["p"]["series"]\np = msg["p"]\n'
              'kind, p = msg["t"], msg.get("p") or {}\n')
    assert sorted(line for line, _ in _payload_reads(ast.parse(before))) == [1, 2, 3, 4]


# -- the master's SQL lives in master/store/ ------------------------------------------------------

SQL = re.compile(
    r"""^\s*(
        SELECT\s.*\bFROM\b | SELECT\s+\d | WITH\s+(RECURSIVE\s+)?\w+.*\bAS\s*\(
      | INSERT\s+(OR\s+\w+\s+)?INTO\s | REPLACE\s+INTO\s | UPDATE\s+\w+\s+SET\s | DELETE\s+FROM\s
      | CREATE\s+(TEMP\w*\s+)?(TABLE|(UNIQUE\s+)?INDEX|VIEW|TRIGGER)\s | DROP\s+(TABLE|INDEX|VIEW|TRIGGER)\s
      | ALTER\s+TABLE\s | PRAGMA\s+\w | VACUUM\b | ROLLBACK\b | COMMIT\s*;?\s*$
      | BEGIN(\s+(DEFERRED|IMMEDIATE|EXCLUSIVE))?(\s+TRANSACTION)?\s*;?\s*$
    )""", re.S | re.X)


def _string_of(node: ast.AST) -> str | None:
    """A string constant, or an f-string's text with each placeholder as ``x``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(v.value) if isinstance(v, ast.Constant) else "x" for v in node.values)
    return None


def _sql_sites(path: Path) -> Iterator[str]:
    sql: dict[int, str] = {}  # one per line: an f-string and its constant parts are all nodes
    calls: dict[int, str] = {}
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.expr):
            continue
        text = _string_of(node)
        if text is not None and SQL.match(text):
            sql.setdefault(node.lineno, f"SQL {text.strip().splitlines()[0][:60]!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("execute", "executemany", "executescript"):
            calls.setdefault(node.lineno, f".{node.func.attr}(...)")
    for lineno, what in sorted([*sql.items(), *calls.items()]):
        yield f"{_rel(path)}:{lineno}: {what}"


def test_no_sql_outside_the_store() -> None:
    found = [site for path in _files("master") if not _under(path, "master/store")
             for site in _sql_sites(path)]
    assert not found, _report(found, "SQL in master/ outside master/store/ (add a method to the Store "
                                     "protocol, master/store/protocol.py, and its SQLite implementation)")


# -- hcsdk's shared room and the services keep off the SDK -----------------------------------------

def test_shared_room_imports_no_sdk_module() -> None:
    rooms = {"hcsdk.protocol", "hcsdk.common", "hcsdk.net", "hcsdk.__version__"}

    def sdk(name: str) -> bool:
        # a private module, or a name from the SDK's top level (`from hcsdk import Client`)
        return bool(PRIVATE_SDK.match(name)) or (name.startswith("hcsdk.") and name.count(".") == 1
                                                  and name not in rooms)

    found = _import_sites(_files(*SHARED_ROOM), sdk)
    assert not found, _report(found, "hcsdk/protocol, common and net import an SDK module (they are the "
                                     "services' library: move the code they need into the room)")


def test_the_shared_room_is_layered() -> None:
    """protocol is the bottom (it imports neither common nor net); common imports no net."""
    found = _import_sites(_files("hcsdk/protocol"), lambda name: name.startswith(("hcsdk.common", "hcsdk.net")))
    found += _import_sites(_files("hcsdk/common"), lambda name: name.startswith("hcsdk.net"))
    assert not found, _report(found, "a lower room of hcsdk imports a higher one (protocol < common < net)")


def test_protocol_and_common_import_no_heavy_library() -> None:
    found = _import_sites(_files("hcsdk/protocol", "hcsdk/common"), lambda name: name.split(".")[0] in HEAVY)
    assert not found, _report(found, f"hcsdk/protocol and hcsdk/common import {'/'.join(HEAVY)}")


def test_protocol_and_common_load_no_heavy_library() -> None:
    """Importing every module of the protocol and common rooms, in a fresh interpreter, loads
    neither httpx, pandas, IPython nor any SDK module (the import chain, not just the files)."""
    modules = sorted(_module_of(path) for path in _files("hcsdk/protocol", "hcsdk/common"))
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
            f"or __import__('re').match({PRIVATE_SDK.pattern!r}, m))\n"
            "print(', '.join(bad)); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, f"importing hcsdk.protocol and hcsdk.common loads {result.stdout or result.stderr}"


def test_services_import_no_private_sdk_module() -> None:
    found = _import_sites(_files(*SERVICES), lambda name: bool(PRIVATE_SDK.match(name)))
    assert not found, _report(found, "master/proxy/agent import a private SDK module (use hcsdk.protocol, "
                                     "hcsdk.common or hcsdk.net)")
