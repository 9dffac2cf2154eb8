"""What store operations raise, whatever the database behind them."""

from __future__ import annotations


class TokenUsedUp(Exception):
    """A join token limited to N enrollments has had them all."""
