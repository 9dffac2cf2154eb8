"""Exponential backoff with full jitter (one implementation for agent, proxy and SDK).

Full jitter spreads reconnects uniformly over the whole window, so a master restart does not
bring every agent back in the same second.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        window = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self._rng.uniform(0, window)

    def reset(self) -> None:
        self.attempt = 0
