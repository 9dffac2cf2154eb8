"""What store operations raise, whatever the database behind them."""

from __future__ import annotations


class TokenUsedUp(Exception):
    """A join token limited to N enrollments has had them all."""


class SchemaError(RuntimeError):
    """The database's schema is not one this code can use (made by a newer master, say)."""
