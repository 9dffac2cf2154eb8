"""Which plugin serves which cmd word, and the online install, removal and listing of plugins.

Plugins come from two places: the examples bundled with the agent (``agent/plugins``) and those
installed online into ``<state>/plugins``; an installed plugin replaces a bundled one of the same
name. The index of installed plugins (``index.json``) is replaced atomically, so the next task
with a cmd word uses the new code while tasks already running finish on the old.

An install carries the bundle's bytes and their SHA-256 in a command the master signed: a proxy
in between can neither swap the bundle nor the hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from hcsdk.common.version import __version__
from hcsdk.protocol.names import is_plugin_name, is_sha256

from .jsonfile import write_json
from .plugins import BUNDLED
from .worker_parent import WorkerGone, WorkerProcess

MAX_BUNDLE = 2 * 1024 * 1024
MAX_UNPACKED = 16 * 1024 * 1024
#: cmd words the agent serves itself, which no plugin may take over
RESERVED_PREFIX = "zy."


class InstallError(Exception):
    """An install or removal that cannot be done; the message says why."""


@dataclass(frozen=True, kw_only=True)
class PluginRef:
    name: str
    version: str
    sha256: str
    source: str  # "bundled" | "installed"
    module: str
    path: str | None = None
    pkg: bool = False
    cmds: tuple[str, ...] = ()

    def request(self) -> dict[str, Any]:
        return {"module": self.module, "path": self.path, "pkg": self.pkg}


class PluginHost:
    def __init__(self, plugin_dir: Path, worker: WorkerProcess, builtin: Callable[[], set[str]]) -> None:
        self.dir = plugin_dir
        self.worker = worker
        self._builtin = builtin
        self.installed: dict[str, dict[str, Any]] = self._read_index()
        self.routes: dict[str, PluginRef] = {}
        self._reroute()
        self._changing = anyio.Lock()  # one install or removal at a time: they share the index
        self._requests = 0

    # -- routing ----------------------------------------------------------------------------
    def plugin_for(self, cmd: str) -> PluginRef | None:
        return self.routes.get(cmd)

    def commands(self) -> set[str]:
        return set(self.routes)

    def _bundled(self) -> dict[str, PluginRef]:
        return {name: PluginRef(name=name, version=__version__, sha256="", source="bundled",
                                module=f"agent.plugins.{name}", cmds=cmds) for name, cmds in BUNDLED.items()}

    def _refs(self) -> dict[str, PluginRef]:
        refs = self._bundled()
        for name, entry in self.installed.items():
            refs[name] = PluginRef(name=name, version=entry["version"], sha256=entry["sha256"], source="installed",
                                   module=_module_name(name, entry["sha256"]), path=entry["path"],
                                   pkg=entry["kind"] == "zip", cmds=tuple(c["cmd"] for c in entry["cmds"]))
        return refs

    def _reroute(self) -> None:
        self.routes = {cmd: ref for ref in self._refs().values() for cmd in ref.cmds}

    # -- the index --------------------------------------------------------------------------
    def _read_index(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.dir / "index.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # a damaged index must not stop the agent: it serves the bundled plugins and says so
            (self.dir / "index.json").replace(self.dir / f"index.json.damaged.{int(time.time())}")
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and Path(v.get("path", "")).exists()}

    def _write_index(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "index.json", self.installed)

    # -- install / remove / list ------------------------------------------------------------
    async def install(self, args: dict[str, Any]) -> dict[str, Any]:
        async with self._changing:
            return await self._install(args)

    async def _install(self, args: dict[str, Any]) -> dict[str, Any]:
        name, sha, kind = _plugin_name(args.get("name")), args.get("sha256"), args.get("kind", "py")
        if not is_sha256(sha):
            raise InstallError("args.sha256 must be 64 lowercase hex digits")
        if kind not in ("py", "zip"):
            raise InstallError(f"args.kind must be 'py' or 'zip' (got {kind!r})")
        try:
            data = base64.b64decode(str(args.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise InstallError("args.data is not valid base64") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise InstallError(f"the bundle's SHA-256 is {actual}, the signed command says {sha}: refused")
        home = self.dir / name / sha[:16]
        path = _unpack(home, name, kind, data)
        ref = PluginRef(name=name, version="?", sha256=sha, source="installed", module=_module_name(name, sha),
                        path=str(path), pkg=kind == "zip")
        try:
            described = await self.describe(ref)
            self._check_cmds(name, [c["cmd"] for c in described["cmds"]])
        except BaseException:
            if not (self.installed.get(name, {}).get("sha256") == sha):
                shutil.rmtree(home, ignore_errors=True)
            raise
        previous = self.installed.get(name)
        self.installed[name] = {"version": described["version"], "sha256": sha, "kind": kind, "path": str(path),
                                "cmds": described["cmds"], "installed_at": time.time()}
        self._write_index()
        self._reroute()
        self._prune(name, keep={sha[:16], (previous or {}).get("sha256", "")[:16]})
        return {"name": name, "version": described["version"], "sha256": sha,
                "cmds": [c["cmd"] for c in described["cmds"]],
                "replaced": previous["version"] if previous else None}

    async def describe(self, ref: PluginRef) -> dict[str, Any]:
        answer: dict[str, Any] = {}

        def on_reply(reply: dict[str, Any]) -> bool:
            answer.update(reply)
            return True

        try:
            self._requests += 1
            await self.worker.request({"op": "describe", "id": f"describe-{self._requests}", **ref.request()},
                                      on_reply, timeout=30)
        except TimeoutError:
            self.worker.kill(f"loading plugin {ref.name} took over 30 s")
            raise InstallError(f"loading plugin {ref.name} took over 30 s (it hangs at import?)") from None
        except WorkerGone as exc:
            raise InstallError(f"loading plugin {ref.name} crashed the worker: {exc}") from None
        if answer.get("k") != "described":
            raise InstallError(f"plugin {ref.name} does not load: {answer.get('error')}")
        if not answer["cmds"]:
            raise InstallError(f"plugin {ref.name} declares no commands (decorate functions with @command)")
        return answer

    def _check_cmds(self, name: str, cmds: list[str]) -> None:
        taken = self._builtin()
        for cmd in cmds:
            owner = self.routes.get(cmd)
            if cmd in taken or cmd.startswith(RESERVED_PREFIX):
                raise InstallError(f"cmd {cmd!r} is built into the agent; a plugin cannot take it over")
            if owner is not None and owner.name != name:
                raise InstallError(f"cmd {cmd!r} is already served by plugin {owner.name!r}; "
                                   f"install under that name to replace it")

    async def remove(self, name: str) -> dict[str, Any]:
        async with self._changing:
            return self._remove(name)

    def _remove(self, name: str) -> dict[str, Any]:
        _plugin_name(name)  # it names a directory that is deleted
        entry = self.installed.pop(name, None)
        if entry is None:
            hint = " (a bundled plugin: it can be replaced, not removed)" if name in BUNDLED else ""
            raise InstallError(f"no installed plugin {name!r} on this agent{hint}")
        self._write_index()
        self._reroute()
        # tasks still running keep the code they loaded; the files go
        shutil.rmtree(self.dir / name, ignore_errors=True)
        return {"name": name, "removed": entry["version"], "now": "bundled" if name in BUNDLED else None}

    def listing(self, builtin_cmds: list[str]) -> list[dict[str, Any]]:
        rows = [{"plugin": "builtin", "version": __version__, "source": "builtin", "sha256": "",
                 "cmds": builtin_cmds}]
        for ref in sorted(self._refs().values(), key=lambda r: r.name):
            rows.append({"plugin": ref.name, "version": ref.version, "source": ref.source, "sha256": ref.sha256,
                         "cmds": list(ref.cmds)})
        return rows

    def _prune(self, name: str, keep: set[str]) -> None:
        for old in (self.dir / name).iterdir():
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)


def _plugin_name(name: object) -> str:
    """``name`` if it may name a plugin: a name from the master's command becomes a directory and a
    module name, so anything else is refused (a trailing newline included)."""
    if not is_plugin_name(name):
        raise InstallError(f"plugin name {name!r} must be lowercase letters, digits and _ (at most 40)")
    assert isinstance(name, str)
    return name


def _module_name(name: str, sha: str) -> str:
    return f"zy_plugin_{name}_{sha[:16]}"


def _unpack(home: Path, name: str, kind: str, data: bytes) -> Path:
    """Write the bundle under ``home``; the file the worker loads."""
    if len(data) > MAX_BUNDLE:
        raise InstallError(f"the bundle takes {len(data)} bytes; plugins are limited to {MAX_BUNDLE}")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    if kind == "py":
        target = home / f"{name}.py"
        target.write_bytes(data)
        return target
    pkg = home / name
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
            if unpacked > MAX_UNPACKED:
                raise InstallError(f"the bundle unpacks to {unpacked} bytes; at most {MAX_UNPACKED}")
            for info in zf.infolist():
                dest = _safe_member(pkg, info.filename)
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(info))
    except zipfile.BadZipFile as exc:
        shutil.rmtree(home, ignore_errors=True)
        raise InstallError(f"the bundle is not a valid zip: {exc}") from None
    except InstallError:
        shutil.rmtree(home, ignore_errors=True)
        raise
    if not (pkg / "__init__.py").is_file():
        shutil.rmtree(home, ignore_errors=True)
        raise InstallError("a zipped plugin must hold a package: __init__.py at the top of the zip")
    return pkg / "__init__.py"


def _safe_member(root: Path, member: str) -> Path:
    parts = Path(member).parts
    if Path(member).is_absolute() or ".." in parts or "\0" in member:
        raise InstallError(f"the bundle holds an unsafe path {member!r}: refused")
    return root.joinpath(*parts)
