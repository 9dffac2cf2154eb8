"""The SDK's exceptions. Backend (httpx, OS) errors are mapped to these in one place.

    ZyError
    ├── UsageError           a local mistake: arguments that cannot work, refused before anything is
    │                        sent (also a ValueError)
    ├── ConfigError          no usable client config (where to find a master, or no token)
    ├── MasterUnreachable    the master could not be reached or went away
    ├── AuthError            token or credential refused (401/403)
    ├── TargetError          a target names no agent, or matches none
    ├── RequestError         the master refused a request as invalid (4xx)
    └── JoinTokenError       a join token is malformed or does not verify
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "JoinTokenError",
    "MasterUnreachable",
    "RequestError",
    "TargetError",
    "UsageError",
    "ZyError",
]


class ZyError(Exception):
    """Base class of every error the SDK raises on purpose."""


class UsageError(ZyError, ValueError):
    """What the caller passed cannot work (a relative ``dest``, ``every`` under a second, a
    string where an argv list goes, a file that is not a plugin): nothing reached the master.
    A ValueError too, since that is what Python code expects of a bad argument."""


class ConfigError(ZyError):
    pass


class MasterUnreachable(ZyError):
    pass


class AuthError(ZyError):
    pass


class TargetError(ZyError):
    pass


class RequestError(ZyError):
    """The master refused the request as invalid; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class JoinTokenError(ZyError):
    pass
