"""Small raw-ASGI helpers for the channel routes, which are too hot for a framework."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from hcsdk.protocol.wire import dumps

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class BodyTimeout(Exception):
    """A request body did not arrive within its deadline (a slow or stalled sender): a 408."""


def header(scope: Scope, name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]  # ASGI: (lower-cased name, value) byte pairs
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        if chunk:
            yield chunk
        if not msg.get("more_body"):
            return


async def read_body(receive: Receive, limit: int) -> bytes:
    buf = bytearray()
    async for chunk in body_chunks(receive):
        buf += chunk
        if len(buf) > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
    return bytes(buf)


async def respond(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = body if isinstance(body, bytes) else dumps(body)
    ctype = b"application/octet-stream" if isinstance(body, bytes) else b"application/json"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def error(send: Send, status: int, message: str, kind: str = "request",
                retry_after: float | None = None) -> None:
    """A JSON error answer. ``retry_after`` (seconds) goes in the body as a float and in the
    ``Retry-After`` header rounded up: a refused client is told when to come back."""
    extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    body: dict[str, Any] = {"error": message, "kind": kind}
    if retry_after is not None:
        body["retry_after"] = round(retry_after, 3)
        extra.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    await respond(send, status, body, extra)


Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


async def dispatch(routes: Mapping[tuple[str, str], Handler], scope: Scope, receive: Receive, send: Send) -> None:
    """Route by (method, path) from an explicit table: anything not in it is a 404."""
    handler = routes.get((scope["method"], scope["path"]))
    if handler is None:
        await error(send, 404, f"no route {scope['method']} {scope['path']}")
        return
    try:
        await handler(scope, receive, send)
    except ClientGone:
        pass
    except BodyTooLarge as exc:
        await _refuse_body(scope, send, 413, str(exc), "request")
    except BodyTimeout as exc:
        await _refuse_body(scope, send, 408, str(exc), "timeout")


async def _refuse_body(scope: Scope, send: Send, status: int, message: str, kind: str) -> None:
    # an HTTP/1.1 connection goes too: the rest of that body would otherwise still be read
    # (HTTP/2 resets just the stream; connection headers are not allowed there)
    extra = [(b"connection", b"close")] if scope.get("http_version", "1.1").startswith("1") else []
    try:
        await respond(send, status, {"error": message, "kind": kind}, extra)
    except Exception:  # the client is gone or the response had started: nothing to tell
        pass
