"""Runs store calls in one worker thread at a time, so SQLite never blocks the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .store import Store

T = TypeVar("T")


class Db:
    def __init__(self, store: Store):
        self.store = store
        self._limiter = anyio.CapacityLimiter(1)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
