"""The proxy's chunk cache (the CDN edge), with real processes: master, proxies, and clients
fetching blobs over TLS as agents do.

Master-side counts come from ``GET /api/v1/status`` (``blobs_served``: blobs that left the
master); the proxies' own counters from ``GET /api/v1/proxies``, which they feed with signed
``stats`` messages up their channels."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from chunkclient import ChunkClient, enroll_clients

from fleet import Fleet, wait_for
from hcsdk._proxies import PROXY_COLUMNS, proxies_sync

MiB = 1024 * 1024
FAST_STATS = ["--stats-every", "0.3"]


def _upload(fleet: Fleet, tmp_path: Path, name: str, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    blob = fleet.client.agents.upload_build(path)
    assert blob["sha256"] == hashlib.sha256(data).hexdigest()
    return str(blob["sha256"]), data


def _served(fleet: Fleet) -> int:
    """Blobs the master has sent (to proxies or agents) since it started."""
    return int(fleet.client.status().get("blobs_served", 0))


def _cached(fleet: Fleet, proxy: str, sha: str) -> Path:
    return fleet.root / "proxies" / proxy / "cache" / sha[:2] / sha


def _counters(fleet: Fleet, proxy: str, requests: int) -> dict[str, Any]:
    """The counters ``proxy`` reports once it has answered ``requests`` requests (and has none
    in flight, so none of the counters is halfway)."""

    def until(c: dict[str, Any]) -> bool:
        return bool(c["requests"] >= requests and c["requests"] == c["hits"] + c["misses"])

    def row() -> dict[str, Any] | None:
        df = fleet.client.proxies()
        rows = df.set_index("hostname")
        if proxy not in rows.index or pd.isna(rows.loc[proxy, "requests"]):
            return None
        counters = rows.loc[proxy].to_dict()
        return counters if until(counters) else None

    return wait_for(row, 20, f"{proxy} to report its cache counters")


@pytest.fixture
def client_dirs(fleet: Fleet) -> list[Path]:
    """Two enrolled agent identities (no agent process uses them) for test clients."""
    return enroll_clients(fleet, ["cc-1", "cc-2"])


def test_a_miss_then_a_hit_and_the_counters(fleet: Fleet, tmp_path: Path, client_dirs: list[Path]) -> None:
    edge = fleet.start_proxy("edge", extra=FAST_STATS)
    sha, data = _upload(fleet, tmp_path, "chunk", 3 * MiB)
    cc = ChunkClient(edge, client_dirs[0])
    cc.handshake()
    assert _served(fleet) == 0
    assert cc.fetch(sha) == data  # a miss: fetched upstream, kept
    assert _cached(fleet, "edge", sha).read_bytes() == data
    assert _served(fleet) == 1
    assert cc.fetch(sha) == data  # a hit: the master is not asked again
    assert _served(fleet) == 1

    # the route keeps its policy and error shapes
    missing = cc.get("0" * 64)
    assert missing.status_code == 404 and missing.json()["kind"] == "blob"
    bad = cc.get("../../etc/passwd")
    assert bad.status_code == 404 and bad.json()["kind"] == "blob"
    stale = cc.get(sha, sid="nope")
    assert stale.status_code == 409 and stale.json()["kind"] == "session"

    c = _counters(fleet, "edge", 3)
    assert (c["requests"], c["hits"], c["misses"], c["upstream_fetches"]) == (3, 1, 2, 2)
    assert c["bytes_from_upstream"] == len(data) and c["bytes_served"] == 2 * len(data)
    assert (c["cache_entries"], c["cache_bytes"], c["limit"]) == (1, len(data), 10 * 1024**3)
    assert c["hit_ratio"] == pytest.approx(1 / 3, abs=1e-3)
    assert c["corrupt_upstream"] == c["corrupt_cached"] == c["evictions"] == 0
    # the Client method and the module function are the same table, with the counters above
    for df in (fleet.client.proxies(), proxies_sync(fleet.client)):
        assert list(df.columns) == PROXY_COLUMNS
        assert list(df["hostname"]) == ["edge"]
        edge_row = df.set_index("hostname").loc["edge"]
        assert bool(edge_row["online"]) and edge_row["via"] == []
        counters = [col for col in PROXY_COLUMNS if col not in ("uuid", "hostname", "online", "via", "stats_at",
                                                                 "last_seen")]
        assert {col: edge_row[col] for col in counters} == {col: c[col] for col in counters}


def test_ten_clients_asking_at_once_cause_one_upstream_fetch(fleet: Fleet, tmp_path: Path,
                                                             client_dirs: list[Path]) -> None:
    from faultproxy import FaultProxy

    link = FaultProxy("127.0.0.1", fleet.port)  # between the proxy and the master
    try:
        edge = fleet.start_proxy("edge", upstreams=[link.url], extra=FAST_STATS)
        fleet.wait_online("edge")
        sha, data = _upload(fleet, tmp_path, "chunk", 4 * MiB)
        cc = ChunkClient(edge, client_dirs[0])
        cc.handshake()
        link.blackhole()  # the upstream fetch hangs until every request is waiting at the proxy
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            answers = pool.submit(cc.get_concurrently, [sha] * 10)
            time.sleep(1.5)  # let all ten reach the proxy (the proxy declares its link dead after 8 s)
            link.heal()
            responses = answers.result(60)
        assert [r.status_code for r in responses] == [200] * 10, responses[0].text
        assert all(r.content == data for r in responses)
        assert _served(fleet) == 1
        c = _counters(fleet, "edge", 10)
        assert (c["upstream_fetches"], c["misses"], c["hits"], c["coalesced"]) == (1, 1, 9, 9)
        assert c["bytes_from_upstream"] == len(data) and c["bytes_served"] == 10 * len(data)
    finally:
        link.close()


def test_the_tracker_schedules_over_http_and_refuses_bad_asks(fleet: Fleet, tmp_path: Path,
                                                             client_dirs: list[Path]) -> None:
    edge = fleet.start_proxy("edge")
    sha, _ = _upload(fleet, tmp_path, "tracked", MiB)
    a, b = (ChunkClient(edge, d) for d in client_dirs)
    for cc, port in ((a, 7001), (b, 7002)):
        cc.handshake()
        assert cc.post("/v1/tracker/announce", {"port": port, "chunks": []}).status_code == 200
    # the tracker schedules only chunks it can know of: of a release sent down to that agent, or
    # cached here (as this one is once fetched); an invented one is refused
    stranger = a.post("/v1/tracker/next", {"want": [sha]})
    assert stranger.status_code == 403 and "not part of a release" in stranger.text
    a.fetch(sha)
    assert a.post("/v1/tracker/next", {"want": [sha], "max": 2}).json() == {"grants": [{"sha": sha, "peer": ""}]}
    assert b.post("/v1/tracker/next", {"want": [sha]}).json() == {"grants": []}  # on its way to a: wait
    a.post("/v1/tracker/next", {"want": [], "got": [sha]})
    assert b.post("/v1/tracker/next", {"want": [sha]}).json() == {"grants": [{"sha": sha, "peer": "127.0.0.1:7001"}]}
    bad = a.post("/v1/tracker/next", {"want": ["not a hash"]})
    assert bad.status_code == 400 and "next 'want' must be a list of SHA-256" in bad.text
    assert a.post("/v1/tracker/announce", {"port": 70000}).status_code == 400


def test_corruption_is_caught_in_the_cache_and_from_upstream(fleet: Fleet, tmp_path: Path,
                                                             client_dirs: list[Path]) -> None:
    edge = fleet.start_proxy("edge", extra=FAST_STATS)
    sha, data = _upload(fleet, tmp_path, "chunk", 2 * MiB)
    cc = ChunkClient(edge, client_dirs[0])
    cc.handshake()
    assert cc.fetch(sha) == data
    cached = _cached(fleet, "edge", sha)
    rotten = bytearray(cached.read_bytes())
    rotten[12345] ^= 0x01  # one flipped bit on the proxy's disk
    cached.write_bytes(bytes(rotten))
    assert cc.fetch(sha) == data  # detected, deleted, fetched again: the client gets good bytes
    assert cached.read_bytes() == data
    assert _served(fleet) == 2

    # a chunk that is corrupt at the origin is neither served nor kept
    sha2, data2 = _upload(fleet, tmp_path, "chunk2", MiB)
    origin = fleet.root / "master" / "blobs" / sha2
    origin.write_bytes(data2[:-1] + bytes([data2[-1] ^ 0xFF]))
    resp = cc.get(sha2)
    assert resp.status_code == 502 and resp.json()["kind"] == "blob" and sha2 in resp.json()["error"]
    assert not _cached(fleet, "edge", sha2).exists()
    origin.write_bytes(data2)  # repaired at the origin: served and kept now
    assert cc.fetch(sha2) == data2 and _cached(fleet, "edge", sha2).exists()

    c = _counters(fleet, "edge", 4)
    assert (c["corrupt_cached"], c["corrupt_upstream"], c["upstream_fetches"]) == (1, 1, 4)


def test_each_tier_of_a_chain_caches(fleet: Fleet, tmp_path: Path, client_dirs: list[Path]) -> None:
    hk = fleet.start_proxy("hk", extra=FAST_STATS)
    th = fleet.start_proxy("th", upstreams=[hk], extra=FAST_STATS)
    sha, data = _upload(fleet, tmp_path, "chunk", 2 * MiB)
    far = ChunkClient(th, client_dirs[0])
    far.handshake()
    assert far.fetch(sha) == data
    assert _cached(fleet, "hk", sha).read_bytes() == data and _cached(fleet, "th", sha).read_bytes() == data
    near = ChunkClient(hk, client_dirs[1])
    near.handshake()
    assert near.fetch(sha) == data  # the first tier has it already
    assert far.fetch(sha) == data  # and so has the second
    assert _served(fleet) == 1
    # the far proxy's counters reach the master through the near one (signed: it cannot alter them)
    for tier in ("th", "hk"):
        c = _counters(fleet, tier, 2)
        assert (c["misses"], c["hits"], c["upstream_fetches"]) == (1, 1, 1), tier


def test_lru_eviction_and_blobs_larger_than_the_cache(fleet: Fleet, tmp_path: Path,
                                                      client_dirs: list[Path]) -> None:
    edge = fleet.start_proxy("edge", extra=[*FAST_STATS, "--cache-size", "3M"])
    chunks = {name: _upload(fleet, tmp_path, name, MiB) for name in "abcd"}
    cc = ChunkClient(edge, client_dirs[0])
    cc.handshake()
    for name in "abc":
        assert cc.fetch(chunks[name][0]) == chunks[name][1]
    assert cc.fetch(chunks["a"][0]) == chunks["a"][1]  # a is now the most recently used
    assert cc.fetch(chunks["d"][0]) == chunks["d"][1]  # full: b, the least recently used, goes
    assert {n for n, (sha, _) in chunks.items() if _cached(fleet, "edge", sha).exists()} == {"a", "c", "d"}
    assert _served(fleet) == 4

    big_sha, big = _upload(fleet, tmp_path, "build", 5 * MiB)  # more than the whole cache
    assert cc.fetch(big_sha) == big
    assert not _cached(fleet, "edge", big_sha).exists()
    assert {n for n, (sha, _) in chunks.items() if _cached(fleet, "edge", sha).exists()} == {"a", "c", "d"}

    c = _counters(fleet, "edge", 6)
    assert (c["evictions"], c["passthrough"], c["cache_entries"], c["cache_bytes"]) == (1, 1, 3, 3 * MiB)
    assert c["limit"] == 3 * MiB

    # --cache-size 0: nothing is kept, everything passes through
    off = fleet.start_proxy("off", extra=["--cache-size", "0"])
    cc.url = off
    cc.handshake()
    assert cc.fetch(chunks["a"][0]) == chunks["a"][1] and cc.fetch(chunks["a"][0]) == chunks["a"][1]
    assert not (fleet.root / "proxies" / "off" / "cache").exists()
    assert _served(fleet) == 7


def test_a_restarted_proxy_keeps_its_cache(fleet: Fleet, tmp_path: Path, client_dirs: list[Path]) -> None:
    cc = ChunkClient(fleet.start_proxy("edge", extra=["--cache-size", "2M"]), client_dirs[0])
    a, b, c = (_upload(fleet, tmp_path, name, MiB) for name in "abc")
    cc.handshake()
    assert cc.fetch(a[0]) == a[1] and cc.fetch(b[0]) == b[1]
    os.utime(_cached(fleet, "edge", a[0]), (1, 1))  # a is the least recently used, on disk
    leftover = _cached(fleet, "edge", a[0]).parent / ".tmp-leftover"
    leftover.write_bytes(b"a crash mid-write")
    fleet.agents.pop("edge").stop()

    cc.url = fleet.start_proxy("edge", extra=["--cache-size", "2M"])  # back, on another port
    cc.handshake()
    assert not leftover.exists()
    assert cc.fetch(c[0]) == c[1]  # full: the order rebuilt from the files says a goes
    assert not _cached(fleet, "edge", a[0]).exists() and _cached(fleet, "edge", b[0]).exists()
    assert cc.fetch(b[0]) == b[1]  # kept across the restart: the master is not asked
    assert _served(fleet) == 3


def test_a_proxy_without_upstream_serves_what_it_has(fleet: Fleet, tmp_path: Path,
                                                     client_dirs: list[Path]) -> None:
    edge = fleet.start_proxy("edge")
    (sha, data), (other, _) = (_upload(fleet, tmp_path, name, MiB) for name in "ab")
    cc = ChunkClient(edge, client_dirs[0])
    cc.handshake()
    assert cc.fetch(sha) == data
    stranger = ChunkClient(edge, client_dirs[1])  # enrolled, but never handshook with this proxy
    assert fleet.master is not None
    fleet.master.stop()

    def upstream_gone() -> bool:
        try:
            cc.handshake(wait=0)
        except Exception as exc:
            return "503" in str(exc)
        return False

    # its session ended with the upstream (any sid is as stale as another now); the cache is still
    # open to it, because the master accepted its credential before
    wait_for(lambda: upstream_gone() and cc.get(sha, sid="ended").status_code == 200, 30,
             "the proxy to lose its upstream and serve from its cache alone")
    assert cc.fetch(sha) == data
    miss = cc.get(other)
    assert miss.status_code == 503 and miss.json()["kind"] == "upstream"
    refused = stranger.get(sha, sid="")
    assert refused.status_code == 409 and refused.json()["kind"] == "session"


@pytest.mark.anyio
async def test_large_cached_files_are_checked_then_streamed(tmp_path: Path) -> None:
    """In process: a cached blob over the in-memory size is hashed, then sent in pieces from the
    same open file; rot in it is caught before a byte is sent."""
    from proxy.cache import Answer, ChunkCache

    data = os.urandom(9 * MiB + 7)
    sha = hashlib.sha256(data).hexdigest()
    fetched: list[str] = []

    async def fetch(want: str) -> Answer:
        fetched.append(want)
        return Answer(200, data)

    async def get(cache: ChunkCache) -> tuple[int, bytes, int]:
        sent: list[dict[str, Any]] = []

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        await cache.serve(sha, send, fetch)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), len(sent) - 1

    cache = ChunkCache(tmp_path / "cache", 64 * MiB)
    assert await get(cache) == (200, data, 1)  # a miss: fetched, kept, sent from memory
    status, body, pieces = await get(cache)
    assert (status, body) == (200, data) and pieces == 10  # a hit: 1 MiB pieces
    path = cache.path(sha)
    rotten = bytearray(path.read_bytes())
    rotten[-1] ^= 0x80
    path.write_bytes(bytes(rotten))
    assert (await get(cache))[:2] == (200, data)
    assert fetched == [sha, sha] and path.read_bytes() == data
    stats = ChunkCache(tmp_path / "cache", 64 * MiB).stats()  # rebuilt from disk
    assert (stats["entries"], stats["size_bytes"]) == (1, len(data))
    assert cache.stats()["corrupt_cached"] == 1 and cache.stats()["hits"] == 1
