"""The agent spool's interface kept in memory, for `zy swarm`: results a killed swarm had not
delivered are lost, where a real agent (agent.spool, SQLite) would resend them after a restart."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from hcsdk.protocol.wire import encode_frame

CLAIMED_KEPT = 4096  # taskids each swarm agent remembers (a real agent keeps 30 days in SQLite)


class MemorySpool:
    """Same methods as agent.spool.Spool; nothing is written to disk."""

    def __init__(self) -> None:
        self._outbox: dict[int, bytes] = {}
        self._ids: dict[tuple[str, int], int] = {}
        self._next = 1
        self._claimed: OrderedDict[str, str] = OrderedDict()
        self.finished = 0

    def append(self, msgs: list[dict[str, Any]]) -> None:
        for m in msgs:
            key = (m["taskid"], m["seq"])
            if key not in self._ids:
                self._ids[key] = self._next
                self._outbox[self._next] = encode_frame(m)
                self._next += 1

    def pending_after(self, last_id: int, limit: int = 500,
                      max_bytes: int = 4 * 1024 * 1024) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        size = 0
        for row_id, frame in self._outbox.items():
            if row_id <= last_id:
                continue
            if len(out) >= limit or (out and size + len(frame) > max_bytes):
                break
            out.append((row_id, frame))
            size += len(frame)
        return out

    def ack(self, pairs: list[list[Any]]) -> None:
        for p in pairs:
            if isinstance(p, list) and len(p) == 2:
                row_id = self._ids.pop((p[0], p[1]), None)
                if row_id is not None:
                    self._outbox.pop(row_id, None)

    def pass_cancel(self, taskid: str) -> None:
        pass  # one process: nobody else runs this agent's tasks

    def take_cancels(self) -> list[str]:
        return []

    def pending_for(self, taskids: set[str]) -> int:
        return sum(1 for taskid, _ in self._ids if taskid in taskids)

    def claim(self, taskid: str, cmd: str) -> bool:
        if taskid in self._claimed:
            return False
        self._claimed[taskid] = "running"
        while len(self._claimed) > CLAIMED_KEPT:
            self._claimed.popitem(last=False)
        return True

    def finish(self, taskid: str, final: list[dict[str, Any]]) -> None:
        self.append(final)
        self._claimed[taskid] = "done"
        self.finished += 1

    def set_pgid(self, taskid: str, pgid: int) -> None:
        pass  # nothing survives the swarm process, so nothing is left to recover

    def interrupted(self) -> list[tuple[str, str, int | None, float]]:
        return []

    def forget_before(self, cutoff: float) -> None:
        pass

    def close(self) -> None:
        self._outbox.clear()
