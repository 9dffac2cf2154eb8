"""The protocol's own errors: whatever the core refuses raises one of these, never anything else,
so an adapter drops a connection or a message on ``except ProtocolError`` and nothing wider."""

from __future__ import annotations

__all__ = ["MessageError", "ProtocolError"]


class ProtocolError(ValueError):
    """The peer sent something the protocol does not allow (bad framing or a malformed message)."""


class MessageError(ProtocolError):
    """A well-framed envelope whose content is not a valid message; ``reason`` says why, in the
    words the master and the agent log today."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
