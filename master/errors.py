"""The master's answer to an SDK request it cannot carry out (turned into an HTTP problem by
the API)."""

from __future__ import annotations

__all__ = ["RequestRejected"]


class RequestRejected(ValueError):
    """A request from the SDK that cannot be carried out; ``kind`` names the cause."""

    def __init__(self, message: str, kind: str = "request", status: int = 422):
        super().__init__(message)
        self.kind = kind
        self.status = status
