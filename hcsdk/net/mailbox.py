"""The server side of a downlink, shared by master and proxy: a per-client mailbox of messages
waiting to be sent, and the writer that streams it (coalesced, heartbeats when idle)."""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio

from hcsdk.net.asgi import Receive, Send
from hcsdk.protocol.messages import Heartbeat
from hcsdk.protocol.wire import encode_frame

__all__ = ["Mailbox", "stream_mailbox"]


class Mailbox:
    """Messages for one connected client. Volatile on purpose: what is lost with it is
    redelivered by the master after the client's next handshake."""

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.outbox: deque[dict[str, Any]] = deque()
        self.wake = anyio.Event()
        self.closed = anyio.Event()
        self.close_reason = ""

    def send(self, msgs: list[dict[str, Any]]) -> None:
        self.outbox.extend(msgs)
        self.wake.set()

    def close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
            self.wake.set()

    def take_frames(self, max_frame: int, max_bytes: int = 256 * 1024) -> bytes:
        """What is waiting, encoded, up to about ``max_bytes``: one write on the wire. Each
        message is serialised once, here."""
        frames: list[bytes] = []
        size = 0
        while self.outbox and size < max_bytes:
            frame = encode_frame(self.outbox.popleft(), max_frame)
            frames.append(frame)
            size += len(frame)
        if not self.outbox:
            self.wake = anyio.Event()
        return b"".join(frames)


async def stream_mailbox(box: Mailbox, receive: Receive, send: Send, heartbeat: float, max_frame: int) -> None:
    """Serve ``box`` as a never-ending response body until it is closed or the client leaves."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/x-zy-frames")]})
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_disconnect, receive, box)
        await _write(box, send, heartbeat, max_frame)
        tg.cancel_scope.cancel()
    try:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:  # the peer is already gone
        pass


async def _watch_disconnect(receive: Receive, box: Mailbox) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    box.close("client disconnected")


async def _write(box: Mailbox, send: Send, heartbeat: float, max_frame: int) -> None:
    hb = Heartbeat(uuid=box.uuid).encode()
    while not box.closed.is_set():
        with anyio.move_on_after(heartbeat):
            await box.wake.wait()
        if box.closed.is_set():
            return
        body = box.take_frames(max_frame) or hb
        try:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        except Exception:
            box.close("write to client failed")
            return
