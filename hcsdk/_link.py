"""The SDK's one seam to the master: :class:`MasterLink`, three calls (a JSON request, a body of
bytes, a stream of lines) that every sibling module (runs, releases, schedules, plugins, agents,
artifacts, proxies) is given at construction and talks through. :class:`HttpLink` implements it
over httpx; nothing else in the SDK touches the httpx client.

A protocol rather than the client itself, so that a sibling depends on these three calls and
not on :class:`~hcsdk.AsyncClient` (whose public methods are the user's API, built on the link).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import httpx

from hcsdk.net.http import check, map_exceptions
from hcsdk.net.tls import client_context

__all__ = ["HttpLink", "MasterLink"]

#: reading a run's event stream: the master sends a keep-alive line well within this
_STREAM_READ_TIMEOUT = 60.0


class MasterLink(Protocol):
    """What the sibling modules may ask of the master (internal to the SDK, not its API)."""

    @property
    def url(self) -> str: ...

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """A JSON request; the JSON answer, or the matching ZyError."""
        ...

    async def send(self, path: str, content: bytes | AsyncIterable[bytes], *, timeout: float | None = None) -> Any:
        """POST a body of bytes (a blob, a build): the JSON answer."""
        ...

    def lines(self, path: str, params: dict[str, Any]) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """A streamed GET, line by line, once the master answered 200 (else its ZyError)."""
        ...


class HttpLink:
    """:class:`MasterLink` over one httpx client (HTTP/2 and the fleet's CA, or a test's transport)."""

    def __init__(self, url: str, token: str, *, ca: str | None, timeout: float, http2: bool,
                 transport: httpx.AsyncBaseTransport | None) -> None:
        self.url = url
        self._stream_timeout = httpx.Timeout(timeout, read=_STREAM_READ_TIMEOUT)
        network: dict[str, Any] = (
            {"transport": transport} if transport is not None
            else {"http2": http2, "verify": client_context(ca, http2=http2)})
        self._http = httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {token}"},
                                       timeout=timeout, **network)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        with map_exceptions(self.url):
            resp = await self._http.request(method, path, **kwargs)
        return check(resp)

    async def send(self, path: str, content: bytes | AsyncIterable[bytes], *, timeout: float | None = None) -> Any:
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        with map_exceptions(self.url):
            resp = await self._http.post(path, content=content,
                                         headers={"content-type": "application/octet-stream"}, **options)
        return check(resp)

    @asynccontextmanager
    async def lines(self, path: str, params: dict[str, Any]) -> AsyncIterator[AsyncIterator[str]]:
        # transport errors are left as httpx raised them: the run's reader knows how to resume
        async with self._http.stream("GET", path, params=params, timeout=self._stream_timeout) as resp:
            if resp.status_code != 200:
                await resp.aread()
                check(resp)
            yield resp.aiter_lines()
