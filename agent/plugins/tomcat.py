"""``tomcat.status``: a Tomcat's JVM memory and per-connector threads and requests, from the
manager application's XML status page (``/manager/status?XML=true``; the user needs the
``manager-status`` role).

The result is flat, so a scheduled collection stores it as one sample: ``jvm_free``,
``jvm_total``, ``jvm_max``, ``jvm_used`` (bytes), ``connectors`` (how many), and per connector,
under its name made safe (``"http-nio-8080"`` becomes ``http_nio_8080``):
``<name>.threads_max``, ``.threads_current``, ``.threads_busy``, ``.requests``, ``.errors``,
``.max_time_ms``, ``.processing_time_ms``, ``.bytes_received``, ``.bytes_sent``. Memory pools and
the per-request worker table are left out.

Only ``http://`` and ``https://`` URLs are fetched. Basic auth is sent with the request when
``user`` is given, and never passed on to a redirect. A loopback URL bypasses any HTTP proxy
set in the environment.
"""

from __future__ import annotations

import base64
import http.client
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

from agent.plugins.api import Arg, Context, PluginError, command

VERSION = "1.0"

DEFAULT_URL = "http://127.0.0.1:8080/manager/status?XML=true"
MAX_BODY = 8 * 1024 * 1024
MiB = 1024 * 1024
_LOOPBACK = ("localhost", "127.0.0.1", "::1")

#: XML attribute -> result field, per connector element
_THREADS = {"maxThreads": "threads_max", "currentThreadCount": "threads_current", "currentThreadsBusy": "threads_busy"}
_REQUESTS = {"requestCount": "requests", "errorCount": "errors", "maxTime": "max_time_ms",
             "processingTime": "processing_time_ms", "bytesReceived": "bytes_received", "bytesSent": "bytes_sent"}


# -- fetching ----------------------------------------------------------------------------------

def _request(url: str, user: str, password: str) -> urllib.request.Request:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise PluginError(f"url {url!r} must start with http:// or https://")
    req = urllib.request.Request(url, headers={"Accept": "text/xml, application/xml"})
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        req.add_unredirected_header("Authorization", f"Basic {token}")
    return req


def _http_error(url: str, user: str, exc: urllib.error.HTTPError) -> PluginError:
    if exc.code == 401:
        why = (f"the credentials of user {user!r} were refused" if user
               else "give user and password (a Tomcat user with the manager-status role)")
        return PluginError(f"{url} answered 401 Unauthorized: {why}")
    if exc.code == 403:
        return PluginError(f"{url} answered 403 Forbidden: the user lacks the manager-status role, "
                           "or the manager's RemoteAddrValve refuses this host")
    if exc.code == 404:
        return PluginError(f"{url} answered 404 Not Found: is the manager application deployed there?")
    return PluginError(f"{url} answered {exc.code} {exc.reason}")


def fetch(url: str, user: str, password: str, timeout: float) -> bytes:
    """The body at ``url``; PluginError saying what went wrong in words."""
    req = _request(url, user, password)
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK or host.startswith("127.") else []
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            body: bytes = resp.read(MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _http_error(url, user, exc) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            raise PluginError(f"cannot connect to {url}: connection refused (is Tomcat running there?)") from None
        if isinstance(reason, TimeoutError):
            raise PluginError(f"no answer from {url} within {timeout:g} s") from None
        if isinstance(reason, socket.gaierror):
            raise PluginError(f"cannot connect to {url}: unknown host {host!r}") from None
        raise PluginError(f"cannot connect to {url}: {reason}") from None
    except TimeoutError:
        raise PluginError(f"no answer from {url} within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise PluginError(f"{url} broke off the answer: {exc or type(exc).__name__}") from None
    if len(body) > MAX_BODY:
        raise PluginError(f"the answer from {url} is bigger than {MAX_BODY // MiB} MiB: not a status page")
    return body


# -- parsing -----------------------------------------------------------------------------------

def parse(url: str, body: bytes) -> ET.Element:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        start = body[:60].decode("utf-8", "replace")
        raise PluginError(f"the answer from {url} is not XML ({exc}): it starts {start!r}; "
                          "is it the manager's status page with ?XML=true?") from None
    if root.tag != "status":
        raise PluginError(f"the answer from {url} is XML but not Tomcat's status (its root is <{root.tag}>)")
    return root


def safe_name(name: str, taken: set[str]) -> str:
    """``'"http-nio-8080"'`` -> ``http_nio_8080``; ``_2``, ``_3``... if that is taken already."""
    base = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "connector"
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


def _numbers(element: ET.Element | None, fields: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for attr, field in fields.items():
        value = element.get(attr) if element is not None else None
        if value is not None:
            try:
                out[field] = int(value)
            except ValueError:
                continue  # Tomcat prints numbers; anything else is left out rather than guessed
    return out


def flatten(root: ET.Element) -> tuple[dict[str, object], list[tuple[str, dict[str, int]]]]:
    """The flat result, and each connector's figures by display name (for the summary)."""
    result: dict[str, object] = {}
    memory = root.find("jvm/memory")
    if memory is not None:
        jvm = _numbers(memory, {"free": "jvm_free", "total": "jvm_total", "max": "jvm_max"})
        result.update(jvm)
        if "jvm_free" in jvm and "jvm_total" in jvm:
            result["jvm_used"] = jvm["jvm_total"] - jvm["jvm_free"]
    connectors: list[tuple[str, dict[str, int]]] = []
    taken: set[str] = set()
    for connector in root.findall("connector"):
        shown = connector.get("name", "").strip("\"'") or "connector"
        figures = {**_numbers(connector.find("threadInfo"), _THREADS),
                   **_numbers(connector.find("requestInfo"), _REQUESTS)}
        key = safe_name(shown, taken)
        result.update({f"{key}.{field}": value for field, value in figures.items()})
        connectors.append((shown, figures))
    result["connectors"] = len(connectors)
    return result, connectors


def _mib(n: object) -> str:
    return f"{n / MiB:.1f} MiB" if isinstance(n, int) else "?"


def summary(result: dict[str, object], connectors: list[tuple[str, dict[str, int]]]) -> str:
    lines = []
    if "jvm_total" in result:
        lines.append(f"JVM memory: {_mib(result.get('jvm_used'))} used of {_mib(result['jvm_total'])} "
                     f"(max {_mib(result.get('jvm_max'))})")
    for shown, f in connectors:
        threads = (f"{f.get('threads_busy', '?')} of {f.get('threads_current', '?')} threads busy "
                   f"(max {f.get('threads_max', '?')})")
        requests = (f"; {f['requests']} requests, {f.get('errors', '?')} errors, slowest {f.get('max_time_ms', '?')} ms"
                    if "requests" in f else "")
        lines.append(f"{shown}: {threads}{requests}")
    return "\n".join(lines or ["the status page lists no JVM memory and no connector"]) + "\n"


@command("tomcat.status", args={
    "url": Arg(str, default=DEFAULT_URL, help="the manager's XML status page"),
    "user": Arg(str, default="", help="a Tomcat user with the manager-status role"),
    "password": Arg(str, default=""),
    "timeout": Arg(float, default=5.0, min=0.1, max=300, help="seconds"),
})
def status(ctx: Context, url: str, user: str, password: str, timeout: float) -> dict[str, object]:
    """Tomcat's JVM memory and connector threads and requests, from the manager's status page."""
    root = parse(url, fetch(url, user, password, timeout))
    result, connectors = flatten(root)
    ctx.out(summary(result, connectors))
    return result
