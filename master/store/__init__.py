"""The master's durable state behind one interface.

``Store`` (protocol.py) lists every operation the master needs; ``SQLiteStore`` (sqlite*.py)
holds every SQL statement of the master; ``migrations/`` the numbered schema, applied on open
(migrate.py); ``StoreThread`` (offload.py) runs store calls off the event loop.
``PostgresStore`` (postgres*.py, ``migrations_pg/``) is the same for several masters sharing one
PostgreSQL. ``open_store(data_dir, url)`` is how the master opens its store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SchemaError, TokenUsedUp
from .offload import Coalesced, CoalescedSubsets, StoreThread
from .protocol import (
    AgentRecord,
    ArtifactRecord,
    JoinTokenRecord,
    ReleaseRecord,
    ReleaseSummary,
    ReleaseTargetRecord,
    Result,
    Store,
)
from .sqlite import SQLiteStore, open_sqlite

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = ["AgentRecord", "ArtifactRecord", "JoinTokenRecord", "PostgresStore", "ReleaseRecord", "ReleaseSummary",
           "ReleaseTargetRecord", "Result", "SQLiteStore", "SchemaError", "Store", "StoreThread", "TokenUsedUp",
           "Coalesced", "CoalescedSubsets", "open_store"]


def open_store(data_dir: Path, url: str | None = None) -> Store:
    """The master's store: PostgreSQL at ``url`` when given (``postgresql://...``, shared by
    several masters), else the SQLite file in ``data_dir``."""
    if url is None:
        return open_sqlite(data_dir)
    if not url.startswith(("postgresql://", "postgres://")):
        from .postgres import redact  # (a wrong URL may still hold a password: never in a message)

        raise SchemaError(f"--store {redact(url)!r}: expected a postgresql://user@host/db URL")
    from .postgres import open_postgres

    return open_postgres(url)


def __getattr__(name: str) -> Any:
    """``PostgresStore`` on first use: a master on SQLite never loads psycopg."""
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
