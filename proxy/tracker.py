"""The proxy as tracker: which of its clients hold which chunk (a central tracker; no DHT, no
broadcast in the customer's network). Agents announce chunks as they get them; a lookup
answers, per chunk, a few peers (random among the holders, so load spreads) and how many hold it,
so the asking agent can fetch the rarest chunks first. A client's announcements end with its
session. Nothing here is durable: agents announce again after a proxy restart.
"""

from __future__ import annotations

import random
import re
from typing import Any

_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_ANNOUNCE = 100_000


class TrackerError(ValueError):
    pass


class Tracker:
    def __init__(self) -> None:
        #: sha -> session ids holding it
        self.holders: dict[str, set[str]] = {}
        #: session id -> (address "host:port", its chunks)
        self.peers: dict[str, tuple[str, set[str]]] = {}

    def announce(self, sid: str, host: str, body: Any) -> int:
        if not isinstance(body, dict):
            raise TrackerError("announce wants a JSON object")
        port, chunks = body.get("port"), body.get("chunks", [])
        if not isinstance(port, int) or not 0 < port < 65536:
            raise TrackerError("announce needs the peer port (1-65535)")
        if not isinstance(chunks, list) or len(chunks) > MAX_ANNOUNCE or not all(
                isinstance(c, str) and _SHA.match(c) for c in chunks):
            raise TrackerError("announce 'chunks' must be a list of SHA-256 hex digests")
        address, held = self.peers.get(sid, (f"{host}:{port}", set()))
        address = f"{host}:{port}"
        held.update(chunks)
        self.peers[sid] = (address, held)
        for sha in chunks:
            self.holders.setdefault(sha, set()).add(sid)
        return len(held)

    def lookup(self, sid: str, body: Any, live: set[str]) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("chunks"), list):
            raise TrackerError("lookup wants {'chunks': [sha256, ...]}")
        try:
            want = max(1, min(int(body.get("max", 4)), 16))
        except (TypeError, ValueError):
            raise TrackerError("lookup 'max' must be a number") from None
        peers: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        for sha in body["chunks"][:MAX_ANNOUNCE]:
            if not isinstance(sha, str):
                raise TrackerError("lookup 'chunks' must be SHA-256 hex digests")
            holders = [s for s in self.holders.get(sha, ()) if s != sid and s in live]
            counts[sha] = len(holders)
            random.shuffle(holders)
            peers[sha] = [self.peers[s][0] for s in holders[:want]]
        return {"peers": peers, "counts": counts}

    def forget(self, sid: str) -> None:
        _, held = self.peers.pop(sid, ("", set()))
        for sha in held:
            holders = self.holders.get(sha)
            if holders is not None:
                holders.discard(sid)
                if not holders:
                    del self.holders[sha]

    @property
    def stats(self) -> dict[str, int]:
        return {"peers": len(self.peers), "chunks": len(self.holders)}
