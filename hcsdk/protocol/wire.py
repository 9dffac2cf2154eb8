"""The channel's framing and envelope: bytes in, messages out; messages in, bytes out.

No I/O happens here, so master, proxy and agent share it and tests drive it without sockets.

A frame is a 4-byte big-endian length followed by that many bytes of a JSON object (the
envelope). The length comes first so an oversized frame is refused before it is buffered.

Envelope keys: ``t`` (message type), ``uuid`` (target agent), ``cmd`` (the plugin word),
``taskid``, ``seq`` (per-task sequence number) and ``p`` (payload). Relays route on ``uuid``
and never look inside ``p``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from .depth import MAX_DEPTH, nests_deeper
from .errors import ProtocolError

try:  # orjson is several times faster; the agent must still run without it.
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - exercised by the zero-dependency agent build
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(data: bytes | str) -> Any:
        return json.loads(data)


__all__ = [
    "DEFAULT_MAX_FRAME",
    "DOWN_TYPES",
    "MAX_DEPTH",
    "UP_TYPES",
    "FrameDecoder",
    "FrameError",
    "dumps",
    "encode_batch",
    "encode_frame",
    "loads",
    "nests_deeper",
]

DEFAULT_MAX_FRAME = 4 * 1024 * 1024
_HEADER = struct.Struct(">I")

#: master -> agent: run a task, cancel it, acknowledge results, heartbeat
DOWN_TYPES = frozenset({"task", "cancel", "ack", "hb"})
#: agent -> master: a task started, output chunk, final status, heartbeat, a scheduled
#: collection's sample; and from a proxy, "bye" when a client behind it went away and "stats"
#: (its chunk cache's counters, in ``p.cache``)
UP_TYPES = frozenset({"start", "out", "done", "hb", "bye", "sample", "stats"})


class FrameError(ProtocolError):
    """The peer sent bytes that are not a valid frame; the connection must be dropped."""


def encode_frame(msg: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame; raises FrameError for a message the peer's decoder would refuse (too big or
    nested too deep), so a sender never queues what costs it the connection."""
    try:
        body = dumps(msg)
    except TypeError:  # orjson stops at 255 levels: say why, as the decoder would
        if nests_deeper(msg, MAX_DEPTH):
            raise FrameError(f"message nests deeper than {MAX_DEPTH} levels of objects and lists") from None
        raise
    if len(body) > max_frame:
        raise FrameError(f"message of {len(body)} bytes exceeds the frame limit of {max_frame}")
    if _may_nest_deeper(body) and nests_deeper(msg, MAX_DEPTH, body):
        raise FrameError(f"message nests deeper than {MAX_DEPTH} levels of objects and lists")
    return _HEADER.pack(len(body)) + body


def _may_nest_deeper(body: bytes) -> bool:
    """False when ``body`` is too small and has too few brackets to nest past the bound: the
    hot path's answer without a walk (a big body is left to nests_deeper's budgeted walk)."""
    return len(body) > _COUNT_INLINE or body.count(b"{") + body.count(b"[") > MAX_DEPTH


_COUNT_INLINE = 4096


def encode_batch(msgs: Iterable[dict[str, Any]], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode several messages into one buffer, so a writer sends them in one DATA frame."""
    return b"".join(encode_frame(m, max_frame) for m in msgs)


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole messages back.

    ``allowed`` restricts the message types this side accepts; anything else is a FrameError.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, allowed: frozenset[str] | None = None):
        self._buf = bytearray()
        self._max = max_frame
        self._allowed = allowed

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= 4:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > self._max:
                raise FrameError(f"frame of {size} bytes exceeds the limit of {self._max}")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            out.append(self._parse(body))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buf)

    def _parse(self, body: bytes) -> dict[str, Any]:
        try:
            msg = loads(body)
        except RecursionError:  # the stdlib's json (the zero-dependency agent) on very deep input
            raise FrameError(f"frame nests deeper than {MAX_DEPTH} levels of objects and lists") from None
        except ValueError as exc:
            raise FrameError(f"frame is not valid JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise FrameError("frame is not a JSON object")
        if _may_nest_deeper(body) and nests_deeper(msg, MAX_DEPTH, body):
            raise FrameError(f"frame nests deeper than {MAX_DEPTH} levels of objects and lists")
        kind = msg.get("t")
        if not isinstance(kind, str) or (self._allowed is not None and kind not in self._allowed):
            raise FrameError(f"unknown message type {kind!r}")
        return msg
