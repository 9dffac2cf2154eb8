"""What the SQLite store's parts share: the connection and its transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from hcsdk.protocol.tasks import FINAL
from hcsdk.protocol.wire import dumps

__all__ = ["FINAL", "FINAL_SQL", "SQLiteBase", "in_chunks", "js", "sql_list"]


def sql_list(words: Iterable[str]) -> str:
    """Words of the protocol's vocabulary (statuses, verdicts) as an SQL list: ('ok','failed',...)."""
    return "(" + ",".join(f"'{w}'" for w in words) + ")"


#: the final task statuses as an SQL list
FINAL_SQL = sql_list(FINAL)


class SQLiteBase:
    """One connection in autocommit mode; writes that must land together use ``transaction()``."""

    db: sqlite3.Connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise


def js(value: Any) -> str:
    """A value as the JSON text the store keeps in TEXT columns."""
    return dumps(value).decode()


def in_chunks(ids: list[str], size: int = 500) -> Iterator[tuple[list[str], str]]:
    """``ids`` in parts of ``size`` with the ``(?,?,...)`` list for each (SQLite caps parameters)."""
    for i in range(0, len(ids), size):
        part = ids[i : i + size]
        yield part, "(" + ",".join("?" * len(part)) + ")"
