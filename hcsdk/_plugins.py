"""Plugins online: install, list and remove them on sets of agents (``client.plugins``).

>>> client.plugins.install("plugins/hello.py", targets="web-*")      # one row per agent
>>> client.plugins.list("web-*")                                      # one row per agent and plugin
>>> client.plugins.remove("hello", targets="web-*")

A bundle is one ``.py`` file, or a package directory (zipped here). Its SHA-256 travels in the
command the master signs, and each agent checks the bytes against it before loading them.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hcsdk._sync import SyncFace, blocking
from hcsdk._targets import TargetsLike
from hcsdk.common.errors import UsageError
from hcsdk.protocol.names import is_plugin_name
from hcsdk.protocol.tasks import TaskStatus
from hcsdk.protocol.vocab import PLUGIN_INSTALL, PLUGIN_REMOVE, PLUGINS

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._client import AsyncClient
    from hcsdk._run import AsyncRun

__all__ = ["INSTALL_COLUMNS", "LIST_COLUMNS", "AsyncPlugins", "Plugins", "bundle"]

INSTALL_COLUMNS = ["uuid", "hostname", "status", "plugin", "version", "sha256", "cmds", "replaced", "error"]
LIST_COLUMNS = ["uuid", "hostname", "status", "plugin", "version", "source", "sha256", "cmds", "error"]
MAX_BUNDLE = 2 * 1024 * 1024


def bundle(path_or_package: str | Path) -> tuple[str, str, bytes]:
    """(name, kind, bytes) of a plugin: a ``.py`` file, a package directory, or the name of an
    importable module or package (``"mycompany.plugins.tomcat"``)."""
    path = Path(path_or_package)
    if not path.exists() and isinstance(path_or_package, str) and "/" not in path_or_package:
        spec = importlib.util.find_spec(path_or_package)
        if spec is None or spec.origin is None:
            raise UsageError(f"no plugin file, directory or importable module {path_or_package!r}")
        path = Path(spec.origin)
        if path.name == "__init__.py":
            path = path.parent
    if path.is_dir():
        if not (path / "__init__.py").is_file():
            raise UsageError(f"{path} is a directory without __init__.py: a plugin is a .py file or a package")
        name, kind, data = path.name, "zip", _zip_package(path)
    elif path.suffix == ".py" and path.is_file():
        name, kind, data = path.stem, "py", path.read_bytes()
    else:
        raise UsageError(f"{path} is not a plugin: give a .py file or a package directory")
    if not is_plugin_name(name):  # the agent refuses any other name too
        raise UsageError(f"plugin name {name!r} (from {path.name}) must be lowercase letters, digits and _")
    if len(data) > MAX_BUNDLE:
        raise UsageError(f"{path} makes a bundle of {len(data)} bytes; plugins are limited to {MAX_BUNDLE}")
    return name, kind, data


def _zip_package(root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(root.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                # fixed timestamps: the same sources make the same bytes, so the same SHA-256
                info = zipfile.ZipInfo(str(file.relative_to(root)), date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, file.read_bytes())
    return buf.getvalue()


class AsyncPlugins:
    """Plugins on agents (``AsyncClient().plugins``): each call is one run on the targets,
    one row per agent in the answer."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def install(self, path_or_package: str | Path, targets: TargetsLike, *,
                      timeout: float = 120) -> pd.DataFrame:
        """Install (or replace) a plugin on ``targets``; they load it without restarting. The
        next task with its cmd words runs the new code; running tasks finish on the old."""
        name, kind, data = bundle(path_or_package)
        args = {"name": name, "kind": kind, "sha256": hashlib.sha256(data).hexdigest(),
                "data": base64.b64encode(data).decode()}
        run = await self._client.run(cmd=PLUGIN_INSTALL, args=args, targets=targets, timeout=timeout)
        return await _outcomes(run, name)

    async def remove(self, name: str, targets: TargetsLike, *, timeout: float = 60) -> pd.DataFrame:
        """Remove an installed plugin (a bundled one of that name takes over again)."""
        run = await self._client.run(cmd=PLUGIN_REMOVE, args={"name": name}, targets=targets, timeout=timeout)
        return await _outcomes(run, name)

    async def list(self, targets: TargetsLike, *, timeout: float = 60) -> pd.DataFrame:
        """Every plugin on every target: one row per agent and plugin, with its version,
        source (builtin, bundled, installed), SHA-256 and cmd words."""
        import pandas as pd

        run = await self._client.run(cmd=PLUGINS, args={}, targets=targets, timeout=timeout)
        await run.wait()
        recs: list[dict[str, Any]] = []
        for row in run.outcomes():
            plugins = (row.result or {}).get("plugins") if row.status == TaskStatus.OK else None
            if not plugins:
                recs.append({"uuid": row.uuid, "hostname": row.hostname, "status": row.status, "error": row.error})
                continue
            for p in plugins:
                recs.append({"uuid": row.uuid, "hostname": row.hostname, "status": row.status, **p, "error": None})
        return pd.DataFrame.from_records(recs, columns=LIST_COLUMNS)


async def _outcomes(run: AsyncRun, name: str) -> pd.DataFrame:
    import pandas as pd

    await run.wait()
    recs = []
    for row in run.outcomes():
        result = row.result or {}
        recs.append({"uuid": row.uuid, "hostname": row.hostname, "status": row.status, "plugin": name,
                     "version": result.get("version") or result.get("removed"), "sha256": result.get("sha256"),
                     "cmds": result.get("cmds"), "replaced": result.get("replaced"), "error": row.error})
    return pd.DataFrame.from_records(recs, columns=INSTALL_COLUMNS)


class Plugins(SyncFace[AsyncPlugins]):
    """The synchronous face of :class:`AsyncPlugins` (``Client().plugins``)."""

    install = blocking(AsyncPlugins.install)
    remove = blocking(AsyncPlugins.remove)
    list = blocking(AsyncPlugins.list)
