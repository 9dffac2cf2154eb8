"""hcsdk: drive a hybrid-cloud fleet from Python and Jupyter.

>>> from hcsdk import Client
>>> client = Client()
>>> client.run("uname -a", targets="label:role=web", timeout=30).to_dataframe()
"""

# ruff: noqa: E402  (the guard below must run before httpx is first imported)

import os as _os
import sys as _sys

# `zy agent|proxy|swarm` (or `python -m hcsdk.cli agent`), recognised before anything is parsed: this package
# is imported before hcsdk.cli runs. While it is imported, ``python -m`` sets ``sys.argv[0]`` to
# "-m"; the `zy` script leaves its own path there.
# `python -m agent` (the agent program alone) sets argv[0] to agent/__main__.py.
if "httpx" not in _sys.modules and (
        (len(_sys.argv) > 1 and _sys.argv[1] in ("agent", "proxy", "swarm")
         and (_sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]).removesuffix(".exe") == "zy"))
        or _sys.argv[0].replace("\\", "/").endswith("agent/__main__.py")):
    # httpx/__init__ imports its command-line client (httpx._main), which drags in click, rich and
    # pygments (~6 MiB resident) when they are installed. httpx guards that import with
    # ``except ImportError``; a None entry in sys.modules makes it raise one, so only `httpx.main`
    # (the `httpx` command, which an agent never runs) falls back to httpx's stub.
    _sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
del _os, _sys

from hcsdk._client import AsyncClient, Client, Run
from hcsdk._display import ResultView, view
from hcsdk._run import COLUMNS, STATUSES, AsyncRun, Event
from hcsdk.common.config import ClientConfig, load_client_config
from hcsdk.common.errors import (
    AuthError,
    ConfigError,
    JoinTokenError,
    MasterUnreachable,
    RequestError,
    TargetError,
    UsageError,
    ZyError,
)
from hcsdk.common.jointoken import JoinToken
from hcsdk.common.version import __version__

__all__ = [
    "COLUMNS",
    "STATUSES",
    "AsyncClient",
    "AsyncRun",
    "AuthError",
    "Client",
    "ClientConfig",
    "ConfigError",
    "Event",
    "JoinToken",
    "JoinTokenError",
    "MasterUnreachable",
    "RequestError",
    "ResultView",
    "Run",
    "TargetError",
    "UsageError",
    "ZyError",
    "__version__",
    "load_client_config",
    "view",
]
