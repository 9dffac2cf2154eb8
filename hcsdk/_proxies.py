"""Proxies and their chunk caches (``client.proxies()``).

>>> client.proxies()[["hostname", "online", "cache_entries", "bytes_from_upstream", "bytes_served", "hit_ratio"]]

Each proxy reports its counters to the master (every 10 s when they changed); they count from
the proxy's start. ``bytes_served / bytes_from_upstream`` is how many times over the cache paid
for the link above the proxy; ``hit_ratio`` is the share of requests answered from the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from hcsdk._client import Client
    from hcsdk._link import MasterLink

__all__ = ["PROXY_COLUMNS", "proxies", "proxies_sync"]

#: counter name in the proxy's report -> column
_COUNTER_COLUMNS = {
    "entries": "cache_entries", "size_bytes": "cache_bytes", "limit_bytes": "limit",
    "bytes_from_upstream": "bytes_from_upstream", "bytes_served": "bytes_served", "hit_ratio": "hit_ratio",
    "requests": "requests", "hits": "hits", "misses": "misses", "coalesced": "coalesced",
    "upstream_fetches": "upstream_fetches", "upstream_errors": "upstream_errors",
    "corrupt_upstream": "corrupt_upstream", "corrupt_cached": "corrupt_cached", "evictions": "evictions",
    "passthrough": "passthrough", "write_errors": "write_errors",
}
PROXY_COLUMNS = ["uuid", "hostname", "online", "via", *_COUNTER_COLUMNS.values(), "stats_at", "last_seen"]


async def proxies(link: MasterLink) -> pd.DataFrame:
    """One row per enrolled proxy; counter columns are NaN for a proxy that has not reported."""
    import pandas as pd

    rows: list[dict[str, Any]] = await link.request("GET", "/api/v1/proxies")
    recs = []
    for row in rows:
        cache = row.get("cache") or {}
        recs.append({"uuid": row["uuid"], "hostname": row["hostname"], "online": row["online"],
                     "via": row.get("via", []), "stats_at": row.get("stats_at"), "last_seen": row.get("last_seen"),
                     **{col: cache.get(key) for key, col in _COUNTER_COLUMNS.items()}})
    df = pd.DataFrame.from_records(recs, columns=PROXY_COLUMNS)
    for col in ("stats_at", "last_seen"):
        df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    return df


def proxies_sync(client: Client) -> pd.DataFrame:
    """``client.proxies()``, kept for the scripts that call it by this name."""
    return client.proxies()
