"""An optional capability of a store: keeping blob bytes itself (issue 15, part E).

A store shared by several masters (PostgreSQL) keeps the bytes of every blob (artifact chunks,
agent builds), so every master serves every blob; ``master/blobs.py`` then uses DATA_DIR/blobs
as a read-through cache. A store without the capability (SQLite: one master) leaves the bytes
in files, as before. ``isinstance(store, BlobBytes)`` tells which.

Unlike the rest of the Store, these methods must be safe to call from several threads at once
(a download must not wait behind the store's single worker thread, nor block it for a read of
a megabyte): PostgreSQL takes a pooled connection per call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

__all__ = ["BlobBytes", "BlobDigestError"]


class BlobDigestError(ValueError):
    """The bytes given to ``put_blob`` do not hash to the name they were to be stored under."""


@runtime_checkable
class BlobBytes(Protocol):
    def put_blob(self, sha256: str, chunks: Iterable[bytes]) -> None:
        """Store the bytes ``chunks`` yields (any sizes) under ``sha256``, in one transaction.

        The store hashes what it writes and refuses (BlobDigestError, nothing stored) when it is
        not ``sha256``; an empty blob is refused too. A blob already stored is left as it is."""
        ...

    def has_blob(self, sha256: str) -> bool: ...

    def blob_size(self, sha256: str) -> int | None:
        """The size of a stored blob, None when absent."""
        ...

    def blob_sizes(self, sha256s: list[str]) -> dict[str, int]:
        """sha256 -> size for those stored (one query for a manifest's worth)."""
        ...

    def read_blob(self, sha256: str, offset: int, length: int) -> bytes:
        """Bytes ``offset`` .. ``offset + length`` of a blob (short at its end; empty when absent
        or past the end). ``length`` is bounded (``MAX_READ``): a download reads piece by piece."""
        ...

    def delete_blob(self, sha256: str) -> bool:
        """Forget a blob; False when there was none."""
        ...
