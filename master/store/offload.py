"""Runs store calls in one worker thread at a time, so the database never blocks the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .protocol import Store

T = TypeVar("T")


class StoreThread:
    """``await thread(store.method, *args)``: the call runs in a worker thread, one at a time
    (the SQLite store has one connection). ``store`` is the store itself."""

    def __init__(self, store: Store):
        self.store = store
        self._limiter = anyio.CapacityLimiter(1)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
