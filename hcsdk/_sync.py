"""The synchronous faces, derived from the async classes rather than written again.

A sync class subclasses :class:`SyncFace` over its async twin and lists the methods it offers:

    class Release(SyncFace[AsyncRelease]):
        progress = blocking(AsyncRelease.progress)            # -> pd.DataFrame, as the async one
        wait = blocking_self(AsyncRelease.wait)               # returns this Release
    class Client(SyncFace[AsyncClient]):
        release = wrapping(AsyncClient.release, Release)      # AsyncRelease -> Release

Each is a plain function made once, when the class is created: it runs the coroutine on the
portal's loop (``_portal``), so ``help()`` and IDEs see the async method's parameters and
docstring (``functools.wraps``, with the return annotation rewritten for ``wrap``) and mypy
types the parameters through ``ParamSpec``: nothing about a parameter is written twice.
"""

from __future__ import annotations

import functools
import inspect
import queue
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from hcsdk._portal import portal

__all__ = ["SyncFace", "blocking", "blocking_self", "iterating", "local", "wrapping"]

A = TypeVar("A")
R = TypeVar("R")
S = TypeVar("S")
T = TypeVar("T")
F = TypeVar("F", bound="SyncFace[Any]")
P = ParamSpec("P")


class SyncFace(Generic[A]):
    """A synchronous object over the async one it drives (``self._async``)."""

    _async: A

    def __init__(self, async_obj: A) -> None:
        self._async = async_obj

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the derived methods carry the async method's names; say where they live now, and
        # what the ones that return their object return
        for name, value in vars(cls).items():
            if callable(value) and value in _DERIVED:
                value.__qualname__ = f"{cls.__qualname__}.{name}"
                value.__name__ = name
                if value.__annotations__.get("return") == _SELF:
                    _returns(value, cls.__name__)

    def __repr__(self) -> str:
        return repr(self._async).replace("<Async", "<", 1)


#: the return annotation of a method that returns its own sync face, until the class is known
_SELF = "Self"
#: the functions _derive made (what __init_subclass__ names after the sync class)
_DERIVED: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def _derive(func: Callable[..., Any], afunc: Callable[..., Any], returns: str | None) -> None:
    """``func`` shows ``afunc``'s name, docstring and parameters; ``returns`` replaces the
    return annotation where the sync face hands back something else."""
    functools.update_wrapper(func, afunc)
    if returns is not None:
        _returns(func, returns)
    _DERIVED.add(func)


def _returns(func: Callable[..., Any], returns: str) -> None:
    # a new dict: update_wrapper shares the async method's, which must stay as it is
    func.__annotations__ = {**func.__annotations__, "return": returns}
    func.__signature__ = inspect.signature(func).replace(return_annotation=returns)  # type: ignore[attr-defined]


def _sync_name(obj: Any) -> str:
    return str(getattr(obj, "__name__", obj))


def blocking(afunc: Callable[Concatenate[A, P], Awaitable[R]]) -> Callable[Concatenate[SyncFace[A], P], R]:
    """The blocking form of an async method: same arguments, same result."""

    def call(self: SyncFace[A], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return portal().call(functools.partial(afunc, self._async, *args, **kwargs))

    _derive(call, afunc, None)
    return call


def wrapping(afunc: Callable[Concatenate[A, P], Awaitable[R]], wrap: Callable[[R], S], *,
             undo: Callable[[R], Awaitable[object]] | None = None) -> Callable[Concatenate[SyncFace[A], P], S]:
    """The blocking form of an async method that returns an async object: the caller gets
    ``wrap(result)``, its sync face. With ``undo``, a Ctrl-C while the master was creating the
    object does not leave it behind: once it exists, ``undo`` (e.g. cancel) runs on it."""

    def call(self: SyncFace[A], /, *args: P.args, **kwargs: P.kwargs) -> S:
        if undo is None:
            return wrap(portal().call(functools.partial(afunc, self._async, *args, **kwargs)))
        return wrap(_undoable(functools.partial(afunc, self._async, *args, **kwargs), undo))

    _derive(call, afunc, _sync_name(wrap))
    return call


def _undoable(start: Callable[[], Awaitable[R]], undo: Callable[[R], Awaitable[object]]) -> R:
    async def run() -> R:
        return await start()

    future = portal().start_task_soon(run)
    try:
        return future.result()
    except KeyboardInterrupt:
        # it may exist already on the master: it must not be left running
        try:
            created = future.result(timeout=10)
        except Exception:
            raise KeyboardInterrupt from None
        portal().call(undo, created)
        raise


def blocking_self(afunc: Callable[Concatenate[A, P], Awaitable[object]]) -> Callable[Concatenate[F, P], F]:
    """The blocking form of an async method that acts on its object (``wait``, ``pause``):
    the sync face returns itself, so calls chain as they do on the async object."""

    def call(self: F, /, *args: P.args, **kwargs: P.kwargs) -> F:
        portal().call(functools.partial(afunc, self._async, *args, **kwargs))
        return self

    _derive(call, afunc, _SELF)
    return call


def local(func: Callable[Concatenate[A, P], R]) -> Callable[Concatenate[SyncFace[A], P], R]:
    """A plain (not async) method of the async object, offered as it is: it reads local state
    and needs no loop (``counts``, ``snapshot``)."""

    def call(self: SyncFace[A], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return func(self._async, *args, **kwargs)

    _derive(call, func, None)
    return call


def iterating(agen: Callable[Concatenate[A, P], AsyncIterator[T]],
              ) -> Callable[Concatenate[SyncFace[A], P], Iterator[T]]:
    """An async iterator as a blocking one. One task in the portal drives the async iterator
    (it may hold a lock across its yields); items cross to the caller's thread through a queue."""

    def call(self: SyncFace[A], /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        items: queue.Queue[tuple[str, Any]] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in agen(self._async, *args, **kwargs):
                    items.put(("item", item))
                items.put(("end", None))
            except BaseException as exc:
                items.put(("error", exc))
                raise

        future = portal().start_task_soon(pump)
        try:
            while True:
                kind, value = items.get()
                if kind == "item":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            if not future.done():
                future.cancel()

    returns = str(agen.__annotations__.get("return", "Iterator[Any]"))
    _derive(call, agen, returns.replace("AsyncIterator", "Iterator", 1))
    return call
