"""Proxies and their chunk-cache counters.

Each proxy sends a ``stats`` message up its channel (every 10 s when its counters changed, and
after each new handshake), signed with its end-to-end key. The master keeps the latest one per
proxy in memory only: they are the proxy's own counters since it started, so nothing is lost that
the proxy cannot tell again. ``GET /api/v1/proxies`` lists the enrolled proxies with them.
"""

from __future__ import annotations

import time
from typing import Any
from weakref import WeakKeyDictionary

from fastapi import APIRouter, Depends

from hcsdk.protocol.tasks import SessionKind

from .hub import Hub

__all__ = ["ProxyStats", "of", "proxy_routes"]


class ProxyStats:
    def __init__(self) -> None:
        #: proxy uuid -> (time received, counters)
        self.latest: dict[str, tuple[float, dict[str, int | float]]] = {}

    def record(self, uuid: str, cache: dict[str, int | float]) -> None:
        self.latest[uuid] = (time.time(), dict(cache))

    def get(self, uuid: str) -> tuple[float, dict[str, int | float]] | None:
        return self.latest.get(uuid)


_BY_HUB: WeakKeyDictionary[Hub, ProxyStats] = WeakKeyDictionary()


def of(hub: Hub) -> ProxyStats:
    """The counters kept for ``hub`` (one master process has one hub)."""
    stats = _BY_HUB.get(hub)
    if stats is None:
        stats = _BY_HUB[hub] = ProxyStats()
    return stats


def proxy_routes(hub: Hub, admin: Any) -> APIRouter:
    router = APIRouter(dependencies=[Depends(admin)])

    @router.get("/api/v1/proxies")
    async def proxies() -> list[dict[str, Any]]:
        """Every enrolled proxy: online or not, its path, and the latest counters of its cache
        (``cache`` is empty until the proxy has reported)."""
        rows = await hub.db(hub.db.store.agents)
        stats = of(hub)
        out = []
        for row in rows:
            if (row.get("kind") or SessionKind.AGENT) != SessionKind.PROXY:
                continue
            session = hub.sessions.get(row["uuid"])
            latest = stats.get(row["uuid"])
            out.append({"uuid": row["uuid"], "hostname": row["hostname"], "online": session is not None,
                        "via": [_name(hub, v) for v in session.via] if session else [],
                        "last_seen": row["last_seen"], "stats_at": latest[0] if latest else None,
                        "cache": latest[1] if latest else {}})
        return out

    return router


def _name(hub: Hub, uuid: str) -> str:
    session = hub.sessions.get(uuid)
    return session.hostname if session and session.hostname else uuid
