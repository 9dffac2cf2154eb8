"""Runs store calls in worker threads, so the database never blocks the event loop; and
coalesces concurrent calls of one kind into one thread hop.

Why coalesce: under load a hop to a worker thread and back costs far more than the statement
it carries. Measured in a reconnect storm (5,000 agents handshaking with one master on
PostgreSQL), each of a handshake's four store calls took 10-50 ms while the statement itself
took under 1 ms: the worker waited for the GIL and the event loop for its result, and the pool's
four threads were the queue. Calls made while one of their kind is in flight wait and then go
together, so a storm costs one hop per batch instead of one per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread

from .protocol import Store

T = TypeVar("T")
A = TypeVar("A")

__all__ = ["Coalesced", "CoalescedSubsets", "StoreThread"]


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


class _Call(Generic[A, T]):
    __slots__ = ("arg", "done", "error", "value", "woken")

    def __init__(self, arg: A) -> None:
        self.arg = arg
        self.woken = anyio.Event()
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None


class Coalesced(Generic[A, T]):
    """``await calls(arg)`` is ``await thread(fn, arg)``, except that calls made while one is in
    flight are run together afterwards, in arrival order, in one worker-thread hop (at most
    ``limit`` at a time). Each call gets its own result or its own exception.

    The caller whose call finds none in flight runs the batch; when it is done it hands the
    next batch to the first caller still waiting, so no call runs more than one batch. A call
    cannot be cancelled once queued (the wait is shielded): a cancelled leader would strand the
    batch behind it, and a store call is bounded (the pool's and the statements' timeouts)."""

    def __init__(self, thread: StoreThread, fn: Callable[[A], T], limit: int = 256) -> None:
        self.thread = thread
        self.fn = fn
        self.limit = max(1, limit)
        self._queue: list[_Call[A, T]] = []
        self._busy = False
        #: batches run, and calls in them (how much the coalescing saves: calls / batches)
        self.batches = 0
        self.calls = 0

    async def __call__(self, arg: A) -> T:
        call: _Call[A, T] = _Call(arg)
        self._queue.append(call)
        with anyio.CancelScope(shield=True):
            if self._busy:
                await call.woken.wait()
            else:
                self._busy = True
            if not call.done:
                await self._lead()
        if call.error is not None:
            raise call.error
        return call.value  # type: ignore[return-value]  # (T may itself be Optional)

    async def _lead(self) -> None:
        batch, self._queue = self._queue[:self.limit], self._queue[self.limit:]
        self.batches += 1
        self.calls += len(batch)
        try:
            outcomes = await self.thread(self._run_all, [c.arg for c in batch])
        except BaseException as exc:  # the hop itself failed: every call of the batch hears why
            outcomes = [(None, exc)] * len(batch)
        for call, (value, error) in zip(batch, outcomes, strict=True):
            call.value, call.error, call.done = value, error, True
            call.woken.set()
        if self._queue:
            self._queue[0].woken.set()  # not done: it leads the next batch
        else:
            self._busy = False

    def _run_all(self, args: list[A]) -> list[tuple[T | None, BaseException | None]]:
        out: list[tuple[T | None, BaseException | None]] = []
        for arg in args:
            try:
                out.append((self.fn(arg), None))
            except Exception as exc:  # one call's failure is that call's alone
                out.append((None, exc))
        return out


class CoalescedSubsets(Coalesced[list[str], list[str]]):
    """Coalesced calls of a store method that takes ids and returns those of them it acted on
    (``claim_pending``): a batch is one call with every caller's ids, and each caller gets its
    own share of the answer. One statement (one lock of a run's row) per batch, not per caller.
    If that call fails, the batch's calls are made one by one, so each fails alone."""

    def _run_all(self, args: list[list[str]]) -> list[tuple[list[str] | None, BaseException | None]]:
        try:
            done = set(self.fn([i for ids in args for i in ids]))
        except Exception:
            return super()._run_all(args)
        return [([i for i in ids if i in done], None) for ids in args]
