"""Issue 13, holes 12 and 13: what an agent serves to its LAN and what it lets name its files.

Hole 12: the P2P chunk server (the agent's own PeerServer class, served in-process on a real
loopback socket) is not kept from an honest peer by idle sockets, from one address or from many,
and takes a token once, until its expiry. Hole 13: digests that are not SHA-256 hex never name a
directory on a real agent, and release file names the agent uses for itself (``.zy-*``) are
refused by the SDK, the master and the agent.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from agent.release.chunkstore import ChunkStore
from agent.release.peer import CLOCK_SKEW, HEAD_DEADLINE, PER_ADDRESS, PeerServer, fetch_from_peer, token
from fleet import Fleet
from hcsdk import RequestError, UsageError
from hcsdk._portal import portal
from hcsdk.protocol.manifest import CHUNK_SIZE

KEY = "ab" * 32


@dataclass
class Peer:
    portal: BlockingPortal
    server: PeerServer
    port: int
    sha: str
    data: bytes

    def fetch(self, tok_key: str = KEY) -> bytes:
        """The chunk as an honest peer (from 127.0.0.1) takes it."""
        into = memoryview(bytearray(len(self.data)))
        return bytes(self.portal.call(lambda: fetch_from_peer(f"127.0.0.1:{self.port}", self.sha, tok_key, into)))

    def get(self, tok: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
        """A raw request with token ``tok``: (status, body)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30, source_address=(source, 0)) as conn:
            conn.sendall(f"GET /chunk/{self.sha}?t={tok} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            answer = _read_all(conn)
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    def stat(self, name: str) -> int:
        return int(self.portal.call(lambda: self.server.served[name]))


def _read_all(conn: socket.socket) -> bytes:
    out = b""
    while chunk := conn.recv(1 << 20):
        out += chunk
    return out


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    data = os.urandom(1 << 20)
    release = tmp_path / "release.bin"
    release.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    store = ChunkStore(tmp_path)
    store.add(sha, release, 0, len(data))
    with start_blocking_portal() as p:
        server: PeerServer = p.call(lambda: PeerServer(store, host="127.0.0.1"))  # its locks in its loop
        server.keys.add(KEY)
        future, port = p.start_task(server.serve)
        try:
            yield Peer(p, server, port, sha, data)
        finally:
            future.cancel()


@contextmanager
def _idle(port: int, sources: list[str], count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections from each of ``sources`` that never send a byte."""
    socks: list[socket.socket] = []
    try:
        for source in sources:
            for _ in range(count):
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)))
        yield socks
    finally:
        for s in socks:
            s.close()


def _wait_let_go(socks: list[socket.socket], within: float) -> float:
    """Seconds until the server has closed every one of ``socks`` (each read ends); fails past
    ``within`` (the old server held idle sockets 60 s)."""
    started = time.monotonic()
    for s in socks:
        s.settimeout(max(0.1, within - (time.monotonic() - started)))
        try:
            _read_all(s)  # a 429 answer then EOF, or EOF at the head deadline
        except TimeoutError:
            pytest.fail(f"an idle socket was still held after {within:.0f} s")
        finally:
            s.close()
    return time.monotonic() - started


def _wait(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_idle_sockets_from_one_address_do_not_keep_an_honest_peer_out(peer: Peer) -> None:
    with _idle(peer.port, ["127.0.0.2"], 64) as idle:  # the whole connection budget, from one LAN neighbour
        _wait(lambda: peer.stat("evicted") >= 64 - PER_ADDRESS, "the neighbour's oldest sockets to give way")
        started = time.monotonic()
        assert peer.fetch() == peer.data  # the old server dropped it: every place held for 60 s
        print(f"honest fetch with 64 idle sockets open: {time.monotonic() - started:.3f} s")
        held = _wait_let_go(idle, within=HEAD_DEADLINE + 20)
        print(f"idle sockets let go after {held:.1f} s (head deadline {HEAD_DEADLINE} s)")


def test_idle_sockets_from_the_honest_peers_own_address_give_way_too(peer: Peer) -> None:
    with _idle(peer.port, ["127.0.0.1"], 64) as idle:  # a process on the honest peer's host
        _wait(lambda: peer.stat("evicted") >= 64 - PER_ADDRESS, "the oldest idle sockets to give way")
        assert peer.fetch() == peer.data
        _wait_let_go(idle, within=HEAD_DEADLINE + 20)


def test_idle_sockets_from_many_addresses_give_their_places_up(peer: Peer) -> None:
    sources = [f"127.0.0.{i}" for i in range(2, 7)]
    with _idle(peer.port, sources, PER_ADDRESS) as idle:  # 80 in all: more than the 64 places
        _wait(lambda: peer.stat("evicted") >= len(idle) - 64, "the oldest idle sockets to give their places up")
        assert peer.fetch() == peer.data
        assert peer.stat("evicted") >= len(idle) - 64 + 1  # the honest request took the place of an idle one
        _wait_let_go(idle, within=HEAD_DEADLINE + 20)


def test_a_token_is_taken_once_and_only_until_it_expires(peer: Peer) -> None:
    captured = token(KEY, peer.sha)  # what a LAN neighbour reads off the wire
    status, body = peer.get(captured)
    assert status == 200 and body == peer.data
    assert peer.get(captured, source="127.0.0.9") == (403, b"token already used")

    stale = token(KEY, peer.sha, now=time.time() - 60 - CLOCK_SKEW - 5)  # captured two minutes ago
    assert peer.get(stale) == (403, b"token expired")
    skewed = token(KEY, peer.sha, now=time.time() - CLOCK_SKEW + 10)  # a requester whose clock is behind
    assert peer.get(skewed)[0] == 200
    ahead = token(KEY, peer.sha, now=time.time() + 3600)  # made to outlive the window
    assert peer.get(ahead) == (403, b"token expires too far ahead")
    assert peer.get(token("cd" * 32, peer.sha)) == (403, b"not a peer of this release")

    # the old token (HMAC of the chunk alone, good for ever): refused with a reason
    import hmac

    old = hmac.new(bytes.fromhex(KEY), peer.sha.encode(), hashlib.sha256).hexdigest()
    status, body = peer.get(old)
    assert status == 403 and b"without an expiry" in body
    # a token tampered with (expiry moved on, MAC kept) does not check
    exp, nonce, mac = token(KEY, peer.sha).split(".")
    assert peer.get(f"{int(exp) + 30}.{nonce}.{mac}") == (403, b"not a peer of this release")
    assert peer.fetch() == peer.data  # honest peers are unaffected


# -- hole 13: digests and names -----------------------------------------------------------------
@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("trust-agent"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    fleet.start_agent("ta-1")
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def _run(fl: Fleet, cmd: str, **args: Any) -> dict[str, Any]:
    df = fl.client.run(cmd=cmd, args=args, targets="ta-1", timeout=120).to_dataframe()
    return dict(df.iloc[0])


def _canonical_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_a_digest_that_is_not_hex_names_nothing_on_the_agent(fl: Fleet, tmp_path: Path) -> None:
    # a release directory planted outside the agent's releases, reached through '..' in a "digest"
    state = fl.root / "agents" / "ta-1"
    (state / "releases").mkdir(exist_ok=True)  # there once the agent has fetched any release
    evil = state / "evil"
    evil.mkdir()
    payload = b"not from any release"
    (evil / "payload").write_bytes(payload)
    manifest = {"name": "payload", "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                "chunk_size": CHUNK_SIZE, "chunks": [hashlib.sha256(payload).hexdigest()]}
    (evil / ".zy-manifest.json").write_text(json.dumps(manifest))
    digest = "../evil/././././" + "0" * 48  # 64 characters: the old check was on the length alone
    dest = tmp_path / "app.bin"
    dest.write_bytes(b"the version before")

    placed = _run(fl, "zy.release.place", digest=digest, dest=str(dest))
    assert placed["status"] == "error" and "args.digest" in placed["error"] and "64 lowercase hex" in placed["error"]
    assert dest.read_bytes() == b"the version before"  # the planted file was not placed
    upper = _run(fl, "zy.release.place", digest="A" * 64, dest=str(dest))
    assert upper["status"] == "error" and "64 lowercase hex" in upper["error"]
    rolled = _run(fl, "zy.release.rollback", digest=digest, dest=str(dest))
    assert rolled["status"] == "error" and "args.digest" in rolled["error"]
    bad_sha = _run(fl, "zy.release.place", digest="e" * 64, dest=str(dest), sha256="../" * 21 + "x")
    assert bad_sha["status"] == "error" and "args.sha256" in bad_sha["error"]


def test_the_agents_own_names_are_refused_by_sdk_master_and_agent(fl: Fleet, tmp_path: Path) -> None:
    meta = tmp_path / ".zy-manifest.json"
    meta.write_bytes(os.urandom(1000))
    with pytest.raises(UsageError, match=r"'.zy-manifest.json' is reserved"):
        fl.client.artifacts.upload(meta)
    plain = tmp_path / "app.bin"
    plain.write_bytes(os.urandom(1000))
    for name in (".zy-verified.json", ".app.bin.zy-part", "app.bin.zy-prev", "a\nb"):
        with pytest.raises(UsageError, match="cannot upload"):
            fl.client.artifacts.upload(plain, name=name)
    art = fl.client.artifacts.upload(plain)  # its one chunk is on the master now

    # the master refuses to register it, whatever client sends the manifest
    forged = {**fl.client.artifacts.get(art["id"])["manifest"], "name": ".zy-manifest.json"}
    with pytest.raises(RequestError, match="reserved") as refused:
        portal().call(lambda: fl.client._async._link.request("POST", "/api/v1/artifacts", json={"manifest": forged}))
    assert 400 <= refused.value.status < 500

    # and the agent refuses to write it, should a command name it anyway (its chunk is on the master:
    # without the check the agent fetched it over its own metadata file)
    got = _run(fl, "zy.release.fetch", manifest=forged, digest=_canonical_digest(forged))
    assert got["status"] == "error" and "reserved" in got["error"]
    homes = fl.root / "agents" / "ta-1" / "releases"
    assert not (homes / _canonical_digest(forged)[:16]).exists()
    ok = _run(fl, "zy.release.fetch", manifest=fl.client.artifacts.get(art["id"])["manifest"], digest=art["id"])
    assert ok["status"] == "ok", ok["error"]  # an honest release still arrives
