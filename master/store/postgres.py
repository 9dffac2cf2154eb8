"""The store in PostgreSQL, shared by several masters (issue 15; filled in by the PostgreSQL work)."""

from __future__ import annotations

from .protocol import Store


def open_postgres(url: str) -> Store:
    raise NotImplementedError("the PostgreSQL store is not built yet")
