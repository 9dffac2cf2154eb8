"""Transports and servers the services share: TLS, the HTTP/2 client connection, the channel's client
side, the downlink mailbox, the ASGI and granian embedding, limits and the connection reaper,
enrollment.
"""

import sys as _sys

# httpx/__init__ imports its command-line client (httpx._main), which drags in click, rich and
# pygments (~6 MiB resident) when they are installed. httpx guards that import with
# ``except ImportError``; a None entry in sys.modules makes it raise one, so only `httpx.main` (the
# `httpx` command, which no service runs) falls back to httpx's stub. Every service imports this
# package before httpx, so none of them pays for it; a process that imported httpx already keeps it.
if "httpx" not in _sys.modules:
    _sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
del _sys
