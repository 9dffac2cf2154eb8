"""Runs store calls in worker threads, so the database never blocks the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .protocol import Store

T = TypeVar("T")


class StoreThread:
    """``await thread(store.method, *args)``: the call runs in a worker thread. As many run at
    once as the store says it takes (its ``concurrency``: the PostgreSQL store's pool size); one
    at a time for a store that does not say (the SQLite store has one connection). ``store`` is
    the store itself."""

    def __init__(self, store: Store):
        self.store = store
        self.capacity = max(1, int(getattr(store, "concurrency", 1)))
        self._limiter = anyio.CapacityLimiter(self.capacity)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
