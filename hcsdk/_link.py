"""The SDK's one seam to the master: :class:`MasterLink`, three calls (a JSON request, a body of
bytes, a stream of lines) that every sibling module (runs, releases, schedules, plugins, agents,
artifacts, proxies) is given at construction and talks through. :class:`HttpLink` implements it
over httpx; nothing else in the SDK touches the httpx client.

Several masters: :class:`HttpLink` holds every master's URL (the preferred first). A request
that cannot connect to one (refused, reset or timed out while connecting, TLS handshake failed)
moves to the next and the link remembers the one that answered. A request that may have reached
a master is never sent to another, unless it is a GET (reading twice changes nothing): a run
created twice would run twice. An event stream is a GET by cursor, and any master serves any run
from the shared store, so the run's reader resumes it on whichever master answers.

A protocol rather than the client itself, so that a sibling depends on these three calls and
not on :class:`~hcsdk.AsyncClient` (whose public methods are the user's API, built on the link).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar

import httpx

from hcsdk.common.errors import MasterUnreachable
from hcsdk.net.http import check, never_sent, unreachable
from hcsdk.net.tls import client_context

__all__ = ["HttpLink", "MasterLink"]

#: reading a run's event stream: the master sends a keep-alive line well within this
_STREAM_READ_TIMEOUT = 60.0
#: methods that change nothing on the master, so sending one again elsewhere is harmless
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

T = TypeVar("T")


class MasterLink(Protocol):
    """What the sibling modules may ask of the master (internal to the SDK, not its API)."""

    @property
    def url(self) -> str:
        """The master the link talks to now (the last one that answered)."""
        ...

    async def request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> Any:
        """A JSON request; the JSON answer, or the matching ZyError. ``idempotent``: a change
        the master makes once however often it comes (a named run), so it may be sent again
        to another master after any transport failure, like a read."""
        ...

    async def send(self, path: str, content: bytes | AsyncIterable[bytes], *, timeout: float | None = None) -> Any:
        """POST a body of bytes (a blob, a build): the JSON answer."""
        ...

    def lines(self, path: str, params: dict[str, Any]) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """A streamed GET, line by line, once the master answered 200 (else its ZyError)."""
        ...


class HttpLink:
    """:class:`MasterLink` over one httpx client (HTTP/2 and the fleet's CA, or a test's transport),
    failing over between ``urls`` (one URL, or every master's, the preferred first)."""

    def __init__(self, urls: str | Sequence[str], token: str, *, ca: str | None, timeout: float, http2: bool,
                 transport: httpx.AsyncBaseTransport | None) -> None:
        self.urls = (urls,) if isinstance(urls, str) else tuple(urls)
        if not self.urls:
            raise ValueError("HttpLink needs at least one master URL")
        self._current = 0
        self._stream_timeout = httpx.Timeout(timeout, read=_STREAM_READ_TIMEOUT)
        network: dict[str, Any] = (
            {"transport": transport} if transport is not None
            else {"http2": http2, "verify": client_context(ca, http2=http2)})
        # no base_url: each request names the master it goes to (see _failover)
        self._http = httpx.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=timeout, **network)

    @property
    def url(self) -> str:
        return self.urls[self._current]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> Any:
        async def attempt(url: str) -> httpx.Response:
            return await self._http.request(method, url + path, **kwargs)

        return check(await self._failover(attempt, resend=idempotent or method.upper() in _SAFE_METHODS))

    async def send(self, path: str, content: bytes | AsyncIterable[bytes], *, timeout: float | None = None) -> Any:
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}

        # a body from an iterable is read only once connected: after a connect error it is untouched
        async def attempt(url: str) -> httpx.Response:
            return await self._http.post(url + path, content=content,
                                         headers={"content-type": "application/octet-stream"}, **options)

        return check(await self._failover(attempt, resend=False))

    @asynccontextmanager
    async def lines(self, path: str, params: dict[str, Any]) -> AsyncIterator[AsyncIterator[str]]:
        async def attempt(url: str) -> httpx.Response:
            req = self._http.build_request("GET", url + path, params=params, timeout=self._stream_timeout)
            return await self._http.send(req, stream=True)

        # no master reachable: MasterUnreachable, which the run's reader retries with its backoff;
        # transport errors mid-stream are left as httpx raised them: the reader resumes by cursor
        resp = await self._failover(attempt, resend=True)
        try:
            if resp.status_code != 200:
                await resp.aread()
                check(resp)
            yield resp.aiter_lines()
        finally:
            await resp.aclose()

    async def _failover(self, attempt: Callable[[str], Awaitable[T]], *, resend: bool) -> T:
        """``attempt`` on the current master, then on each next one while it cannot connect (or,
        with ``resend``, fails in any transport way); the one that answered becomes current.
        One pass over the URLs, no waiting: who retries (the run's reader) has the backoff."""
        failures: list[tuple[str, httpx.TransportError]] = []
        for step in range(len(self.urls)):
            index = (self._current + step) % len(self.urls)
            url = self.urls[index]
            try:
                result = await attempt(url)
            except httpx.TransportError as exc:
                if not (resend or never_sent(exc)):
                    raise unreachable(url, exc) from None  # it may have reached this master: not elsewhere
                failures.append((url, exc))
                continue
            self._current = index
            return result
        raise _all_failed(failures)


def _all_failed(failures: list[tuple[str, httpx.TransportError]]) -> MasterUnreachable:
    if len(failures) == 1:
        return unreachable(*failures[0])
    each = "; ".join(str(unreachable(url, exc)) for url, exc in failures)
    return MasterUnreachable(f"no master answered ({len(failures)} tried): {each}")
