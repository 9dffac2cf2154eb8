"""Artifacts on the master, the origin of releases (``client.artifacts``).

>>> art = client.artifacts.upload("dist/app-1.4.tgz")       # {"id", "name", "size", "sha256", "chunks"}
>>> client.artifacts.list()                                 # a DataFrame

An upload reads the file twice, a chunk at a time (once to describe it, once to send what the
master lacks): a multi-GB file never sits in memory. Run it again after an interruption and
only the chunks still missing travel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from hcsdk._sync import SyncFace, blocking
from hcsdk.common.errors import UsageError
from hcsdk.protocol.manifest import CHUNK_SIZE, Manifest, build_manifest
from hcsdk.protocol.names import UnsafeName, check_file_name

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._link import MasterLink

__all__ = ["ARTIFACT_COLUMNS", "Artifacts", "AsyncArtifacts"]

ARTIFACT_COLUMNS = ["id", "name", "size", "sha256", "chunks", "created_at"]
#: called with (bytes sent, bytes to send) as chunks go
Progress = Callable[[int, int], None]


class AsyncArtifacts:
    """Files on the master (``AsyncClient().artifacts``), the origin of releases."""

    def __init__(self, link: MasterLink) -> None:
        self._link = link

    async def upload(self, path: str | Path, *, name: str | None = None, chunk_size: int = CHUNK_SIZE,
                     progress: Progress | None = None) -> dict[str, Any]:
        """Store a file on the master as an artifact; returns its id (the manifest's digest)."""
        path = Path(path)
        try:  # before reading a byte: the master and every agent refuse these names too
            check_file_name(name or path.name, "artifact name")
        except UnsafeName as exc:
            raise UsageError(f"cannot upload {path}: {exc} (pass name=... to store it under another)") from None
        if not await anyio.Path(path).is_file():
            raise UsageError(f"no file at {path}")
        manifest = await anyio.to_thread.run_sync(build_manifest, path, name, chunk_size)
        missing = set(await self._missing(manifest))
        first = {sha: i for i, sha in reversed(list(enumerate(manifest.chunks)))}  # a chunk twice: sent once
        todo = sorted(i for sha, i in first.items() if sha in missing)
        total = sum(manifest.chunk_length(i) for i in todo)
        sent = 0
        if progress is not None:
            progress(0, total)
        for index in todo:
            await self._send_chunk(path, manifest, index)
            sent += manifest.chunk_length(index)
            if progress is not None:
                progress(sent, total)
        info = await self._link.request("POST", "/api/v1/artifacts", json={"manifest": manifest.to_dict()})
        return {**dict(info), "uploaded": sent}

    async def _missing(self, manifest: Manifest) -> list[str]:
        out: list[str] = []
        unique = list(dict.fromkeys(manifest.chunks))
        for i in range(0, len(unique), 10_000):
            body = await self._link.request("POST", "/api/v1/blobs/missing", json={"sha256s": unique[i:i + 10_000]})
            out += body["missing"]
        return out

    async def _send_chunk(self, path: Path, manifest: Manifest, index: int) -> None:
        async with await anyio.open_file(path, "rb") as fh:
            await fh.seek(index * manifest.chunk_size)
            data = await fh.read(manifest.chunk_length(index))
        stored = await self._link.send("/api/v1/blobs", data)
        if stored["sha256"] != manifest.chunks[index]:
            raise UsageError(f"{path} changed while it was uploaded (chunk {index} differs); upload it again")

    async def list(self) -> pd.DataFrame:
        """Every artifact, one row each, newest last."""
        import pandas as pd

        rows = await self._link.request("GET", "/api/v1/artifacts")
        df = pd.DataFrame.from_records(rows, columns=ARTIFACT_COLUMNS)
        df["created_at"] = pd.to_datetime(df["created_at"], unit="s", utc=True)
        return df

    async def get(self, ref: str) -> dict[str, Any]:
        """An artifact with its manifest, by id or by name (the newest of that name)."""
        return dict(await self._link.request("GET", f"/api/v1/artifacts/{ref}"))


class Artifacts(SyncFace[AsyncArtifacts]):
    """The synchronous face of :class:`AsyncArtifacts` (``Client().artifacts``)."""

    upload = blocking(AsyncArtifacts.upload)
    list = blocking(AsyncArtifacts.list)
    get = blocking(AsyncArtifacts.get)
