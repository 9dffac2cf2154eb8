"""The one place where httpx errors and HTTP statuses become the SDK's exceptions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from hcsdk.common.errors import AuthError, MasterUnreachable, RequestError, TargetError, ZyError


@contextmanager
def map_exceptions(url: str) -> Iterator[None]:
    try:
        yield
    except httpx.TransportError as exc:
        raise unreachable(url, exc) from None


def unreachable(url: str, exc: httpx.TransportError) -> MasterUnreachable:
    """The SDK's error for a transport failure talking to the master at ``url``."""
    if isinstance(exc, httpx.TimeoutException):
        return MasterUnreachable(f"the master at {url} did not answer in time ({type(exc).__name__})")
    return MasterUnreachable(f"cannot reach the master at {url}: {exc or type(exc).__name__}" + _tls_hint(str(exc)))


def never_sent(exc: httpx.TransportError) -> bool:
    """Whether the request surely never reached a server: no connection could be made (refused,
    reset or timed out while connecting, TLS handshake failed) or none was free in the pool.
    Anything later (a write, a read, a protocol error) may have reached it."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def _tls_hint(message: str) -> str:
    """What to do when the master's certificate does not verify: it is signed by the master's
    own CA, which no system trust store holds."""
    if "CERTIFICATE_VERIFY_FAILED" not in message:
        return ""
    env = os.environ
    if env.get("ZY_MASTER") and not env.get("ZY_CONFIG") and not env.get("ZY_CA"):
        return ("; ZY_MASTER is set but ZY_CA is not: set ZY_CA to the master's CA certificate "
                "(DATA_DIR/ca.pem on the master), or use ZY_CONFIG=DATA_DIR/client.toml")
    return "; the master's certificate does not verify against the configured CA (ZY_CA, or ca in client.toml)"


def error_message(resp: Any) -> str:
    """The ``error`` a master put in a failed response, or the HTTP status."""
    try:
        return str(resp.json().get("error"))
    except (ValueError, AttributeError, httpx.ResponseNotRead):
        return f"HTTP {resp.status_code}"


def check(resp: httpx.Response) -> Any:
    """Return the JSON body of a 2xx response; raise the matching ZyError otherwise."""
    if resp.is_success:
        try:
            return resp.json()
        except ValueError:
            raise ZyError(f"the answer from {resp.url} is not JSON (is something else listening there?)") from None
    try:
        body = resp.json()
        message, kind = str(body.get("error")), str(body.get("kind", ""))
    except (ValueError, AttributeError):
        message, kind = resp.text[:200] or resp.reason_phrase, ""
    if resp.status_code in (401, 403):
        raise AuthError(f"the master refused the request ({resp.status_code}): {message}")
    if kind == "target":
        raise TargetError(message)
    if 400 <= resp.status_code < 500:
        raise RequestError(message, resp.status_code)
    raise ZyError(f"the master failed ({resp.status_code}): {message}")
