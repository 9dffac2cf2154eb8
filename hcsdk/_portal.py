"""One background event loop per process for the synchronous API.

A Jupyter kernel already runs a loop, so sync calls cannot use ``asyncio.run``; they go to
this loop through an anyio blocking portal, which lives as long as the process.
"""

from __future__ import annotations

import atexit
import threading
from contextlib import AbstractContextManager

from anyio.from_thread import BlockingPortal, start_blocking_portal

_lock = threading.Lock()
_portal: BlockingPortal | None = None
_cm: AbstractContextManager[BlockingPortal] | None = None


def portal() -> BlockingPortal:
    global _portal, _cm
    with _lock:
        if _portal is None:
            _cm = start_blocking_portal()
            _portal = _cm.__enter__()
            atexit.register(_stop)
        return _portal


def _stop() -> None:
    global _portal, _cm
    if _cm is not None:
        try:
            _cm.__exit__(None, None, None)
        except Exception:  # interpreter shutdown: nothing left to report to
            pass
    _portal = _cm = None
