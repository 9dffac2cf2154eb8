"""The SDK's exceptions. Backend (httpx, OS) errors are mapped to these in one place.

    ZyError
    ├── ConfigError          no usable client config (where to find a master)
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
    "ZyError",
]


class ZyError(Exception):
    """Base class of every error the SDK raises on purpose."""


class ConfigError(ZyError):
    pass


class MasterUnreachable(ZyError):
    pass


class AuthError(ZyError):
    pass


class TargetError(ZyError):
    pass


class RequestError(ZyError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class JoinTokenError(ZyError):
    pass
