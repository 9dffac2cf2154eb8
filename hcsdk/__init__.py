"""hcsdk: drive a hybrid-cloud fleet from Python and Jupyter.

>>> from hcsdk import Client
>>> client = Client()
>>> client.run("uname -a", targets="label:role=web", timeout=30).to_dataframe()

The SDK's names load on first use (``__getattr__`` below), so ``import hcsdk.protocol``,
``hcsdk.common`` or ``hcsdk.net`` (what the agent, proxy and master use) pulls in neither httpx's
client nor pandas.
"""

import importlib as _importlib
import typing as _typing

#: public name -> the module that defines it
_WHERE = {
    "AsyncClient": "_client", "Client": "_client",
    "AsyncRun": "_run", "Run": "_run", "Event": "_run", "Outcome": "_run", "COLUMNS": "_run", "STATUSES": "_run",
    "AsyncRelease": "_release", "Release": "_release",
    "AsyncSchedule": "_schedules", "Schedule": "_schedules",
    "AsyncPlugins": "_plugins", "Plugins": "_plugins",
    "AsyncAgents": "_agents", "Agents": "_agents",
    "AsyncArtifacts": "_artifacts", "Artifacts": "_artifacts",
    "ResultView": "_display", "view": "_display", "readable": "_display", "results_table": "_display",
    "status_chip": "_display", "STATUS_COLORS": "_display",
    "arg_pairs": "_cliargs",
    "ClientConfig": "common.config", "load_client_config": "common.config",
    "AuthError": "common.errors", "ConfigError": "common.errors", "JoinTokenError": "common.errors",
    "MasterUnreachable": "common.errors", "RequestError": "common.errors", "TargetError": "common.errors",
    "UsageError": "common.errors", "ZyError": "common.errors",
    "JoinToken": "common.jointoken",
    "__version__": "common.version",
}

# spelled out for mypy, ruff and IDEs; tests/test_sdk_imports.py checks it against _WHERE
__all__ = [
    "Agents",
    "Artifacts",
    "AsyncAgents",
    "AsyncArtifacts",
    "AsyncClient",
    "AsyncPlugins",
    "AsyncRelease",
    "AsyncRun",
    "AsyncSchedule",
    "AuthError",
    "COLUMNS",
    "Client",
    "ClientConfig",
    "ConfigError",
    "Event",
    "JoinToken",
    "JoinTokenError",
    "MasterUnreachable",
    "Outcome",
    "Plugins",
    "Release",
    "RequestError",
    "ResultView",
    "Run",
    "STATUSES",
    "STATUS_COLORS",
    "Schedule",
    "TargetError",
    "UsageError",
    "ZyError",
    "__version__",
    "arg_pairs",
    "load_client_config",
    "readable",
    "results_table",
    "status_chip",
    "view",
]


def __getattr__(name: str) -> _typing.Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'hcsdk' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"hcsdk.{module}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if _typing.TYPE_CHECKING:
    from hcsdk._agents import Agents, AsyncAgents
    from hcsdk._artifacts import Artifacts, AsyncArtifacts
    from hcsdk._cliargs import arg_pairs
    from hcsdk._client import AsyncClient, Client
    from hcsdk._display import STATUS_COLORS, ResultView, readable, results_table, status_chip, view
    from hcsdk._plugins import AsyncPlugins, Plugins
    from hcsdk._release import AsyncRelease, Release
    from hcsdk._run import COLUMNS, STATUSES, AsyncRun, Event, Outcome, Run
    from hcsdk._schedules import AsyncSchedule, Schedule
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
