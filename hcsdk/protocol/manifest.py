"""Chunk manifests: how a released file is split, named and checked, the same everywhere.

A file is cut into chunks of ``chunk_size`` bytes (4 MiB by default; the last one shorter).
Each chunk is stored and moved by its SHA-256, like any blob. The manifest lists the file's
name, size and SHA-256 and every chunk's SHA-256; its own digest (SHA-256 of its canonical
JSON) is what a signed release command carries, so neither a proxy cache nor a peer can swap
a file, or a piece of one, undetected.

>>> manifest = build_manifest(Path("app.tgz"))          # streams: never the whole file in memory
>>> manifest.digest(), manifest.chunks[0], manifest.chunk_length(0)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcsdk.protocol.names import UnsafeName, check_file_name, is_sha256

__all__ = ["CHUNK_SIZE", "Manifest", "ManifestError", "build_manifest", "iter_chunks"]

CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNKS = 1_000_000


class ManifestError(ValueError):
    """A manifest that is malformed or does not describe the bytes it claims to."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    name: str
    size: int
    sha256: str
    chunk_size: int
    chunks: tuple[str, ...]

    def __post_init__(self) -> None:
        try:  # it names the file on every agent, beside the agent's own metadata files
            check_file_name(self.name, "manifest name")
        except UnsafeName as exc:
            raise ManifestError(str(exc)) from None
        if not is_sha256(self.sha256) or not all(is_sha256(c) for c in self.chunks):
            raise ManifestError("manifest hashes must be 64 lowercase hex digits")
        if not 0 < self.chunk_size <= 64 * 1024 * 1024 or self.size < 0 or len(self.chunks) > MAX_CHUNKS:
            raise ManifestError("manifest sizes are out of range")
        expected = -(-self.size // self.chunk_size)
        if len(self.chunks) != expected:
            raise ManifestError(f"a file of {self.size} bytes in {self.chunk_size}-byte chunks has {expected} "
                                f"chunks; the manifest lists {len(self.chunks)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "chunk_size": self.chunk_size,
                "chunks": list(self.chunks)}

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError("a manifest is a JSON object")
        try:
            return cls(name=str(data["name"]), size=int(data["size"]), sha256=str(data["sha256"]),
                       chunk_size=int(data["chunk_size"]), chunks=tuple(str(c) for c in data["chunks"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"malformed manifest: {exc}") from None

    def canonical(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        """What a release command carries: the manifest, and through it every byte, is pinned."""
        return hashlib.sha256(self.canonical()).hexdigest()

    def chunk_length(self, index: int) -> int:
        if index < len(self.chunks) - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (len(self.chunks) - 1)

    def check_chunk(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Raise :class:`ManifestError` unless ``data`` is chunk ``index``."""
        if len(data) != self.chunk_length(index):
            raise ManifestError(f"chunk {index} has {len(data)} bytes, not {self.chunk_length(index)}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.chunks[index]:
            raise ManifestError(f"chunk {index} has SHA-256 {actual}, not {self.chunks[index]}")


def iter_chunks(path: Path, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def build_manifest(path: Path, name: str | None = None, chunk_size: int = CHUNK_SIZE) -> Manifest:
    """Read ``path`` once, a chunk at a time, and describe it."""
    whole = hashlib.sha256()
    chunks, size = [], 0
    for chunk in iter_chunks(path, chunk_size):
        whole.update(chunk)
        chunks.append(hashlib.sha256(chunk).hexdigest())
        size += len(chunk)
    return Manifest(name=name or path.name, size=size, sha256=whole.hexdigest(), chunk_size=chunk_size,
                    chunks=tuple(chunks))
