"""hcsdk: drive a hybrid-cloud fleet from Python and Jupyter.

>>> from hcsdk import Client
>>> client = Client()
>>> client.run("uname -a", targets="label:role=web", timeout=30).to_dataframe()
"""

from ._client import AsyncClient, Client, Run
from ._config import ClientConfig, load_client_config
from ._errors import (
    AuthError,
    ConfigError,
    JoinTokenError,
    MasterUnreachable,
    RequestError,
    TargetError,
    ZyError,
)
from ._jointoken import JoinToken
from ._run import COLUMNS, STATUSES, AsyncRun, Event
from ._version import __version__

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
    "Run",
    "TargetError",
    "ZyError",
    "__version__",
    "load_client_config",
]
