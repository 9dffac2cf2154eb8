"""The proxy: ``zy proxy`` (proxy.cli)."""

import sys as _sys

# keeps httpx's command line (click, rich, pygments) out of the proxy process: see agent/__init__.py
if "httpx" not in _sys.modules:
    _sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
del _sys
