"""Agents behind one proxy share a release's chunks: the proxy tracks who holds what, peers
serve each other, every copy is checked, and a peer with a bad chunk is caught and routed around."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from chunkclient import ChunkClient, enroll_clients

from fleet import Fleet, wait_for
from hcsdk.protocol.manifest import CHUNK_SIZE

NAMES = ("pp-1", "pp-2", "pp-3")


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("p2p"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    edge = fleet.start_proxy("lan")
    for name in NAMES:
        fleet.start_agent(name, {"role": "p2p"}, extra=["--master", edge])
    fleet.start_agent("pp-quiet", {"role": "quiet"}, extra=["--master", edge, "--no-peer"])
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def _edge(fl: Fleet) -> str:
    """The proxy's URL (a restarted one listens on the same port)."""
    return "https://127.0.0.1:" + fl.agents["lan"].output().split("listening on https://127.0.0.1:")[1].split()[0]


def _release(fl: Fleet, tmp_path: Path, targets: list[str], **options: object) -> tuple[object, bytes, Path]:
    data = os.urandom(3 * CHUNK_SIZE + 99)
    package = tmp_path / "pkg.bin"
    package.write_bytes(data)
    art = fl.client.artifacts.upload(package)
    srv = tmp_path / "srv"
    srv.mkdir(exist_ok=True)
    rel = fl.client.release(art["id"], targets, dest=f"{srv}/{{hostname}}.bin", batch=1, **options)  # type: ignore[arg-type]
    rel.wait(timeout=180)
    assert rel.state == "done", rel.info["message"]
    return rel, data, srv


def test_later_shards_take_the_file_from_peers(fl: Fleet, tmp_path: Path) -> None:
    rel, data, srv = _release(fl, tmp_path, list(NAMES))
    df = rel.progress().set_index("hostname")  # type: ignore[attr-defined]
    assert df.loc["pp-1", "bytes_upstream"] == len(data) and df.loc["pp-1", "bytes_peers"] == 0
    for name in ("pp-2", "pp-3"):
        assert df.loc[name, "bytes_peers"] == len(data) and df.loc[name, "bytes_upstream"] == 0
        assert (srv / f"{name}.bin").read_bytes() == data


def test_agents_fetching_together_take_each_chunk_from_the_proxy_about_once(fl: Fleet, tmp_path: Path) -> None:
    data = os.urandom(6 * CHUNK_SIZE + 5)
    (tmp_path / "together.bin").write_bytes(data)
    art = fl.client.artifacts.upload(tmp_path / "together.bin")
    srv = tmp_path / "srv"
    srv.mkdir()
    rel = fl.client.release(art["id"], list(NAMES), dest=f"{srv}/{{hostname}}.bin", batch=len(NAMES))
    assert rel.wait(timeout=180).state == "done", rel.info["message"]
    df = rel.progress()
    # the tracker hands each chunk to one agent from the proxy and the others take it from peers
    assert df["bytes_upstream"].sum() <= 2 * len(data) and df["bytes_peers"].sum() >= len(data)
    assert all((srv / f"{name}.bin").read_bytes() == data for name in NAMES)


def test_a_peer_with_a_corrupt_chunk_is_caught_and_routed_around(fl: Fleet, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK_SIZE)
    package = tmp_path / "c.bin"
    package.write_bytes(data)
    art = fl.client.artifacts.upload(package)
    srv = tmp_path / "srv"
    srv.mkdir()
    first = fl.client.release(art["id"], ["pp-1"], dest=f"{srv}/{{hostname}}.bin").wait(timeout=120)
    assert first.state == "done"
    bad = fl.root / "agents" / "pp-1" / "releases" / art["id"][:16] / "c.bin"
    with open(bad, "r+b") as fh:  # rot in chunk 0 on the seeding peer's disk
        fh.write(bytes(16))
    second = fl.client.release(art["id"], ["pp-2"], dest=f"{srv}/{{hostname}}.bin").wait(timeout=120)
    assert second.state == "done"
    row = second.progress().iloc[0]
    assert row["bytes_peers"] == CHUNK_SIZE and row["bytes_upstream"] == CHUNK_SIZE
    assert (srv / "pp-2.bin").read_bytes() == data


def test_without_p2p_or_without_serving_agents_still_get_the_file(fl: Fleet, tmp_path: Path) -> None:
    rel, data, srv = _release(fl, tmp_path, ["pp-1", "pp-2"], p2p=False)
    df = rel.progress()  # type: ignore[attr-defined]
    assert set(df["bytes_peers"]) == {0} and set(df["bytes_upstream"]) == {len(data)}
    (tmp_path / "q").mkdir()
    quiet, data2, srv2 = _release(fl, tmp_path / "q", ["pp-1", "pp-quiet"])
    qdf = quiet.progress().set_index("hostname")  # type: ignore[attr-defined]
    assert qdf.loc["pp-quiet", "bytes_peers"] == len(data2)  # it takes from peers, serves nobody
    assert (srv2 / "pp-quiet.bin").read_bytes() == data2


def test_after_a_proxy_restart_agents_tell_the_new_tracker_what_they_hold(fl: Fleet, tmp_path: Path) -> None:
    _, data, _ = _release(fl, tmp_path, ["pp-1"])
    sha = hashlib.sha256(data[:CHUNK_SIZE]).hexdigest()
    edge = _edge(fl)
    probe = ChunkClient(edge, enroll_clients(fl, ["pp-probe"], url=edge)[0])
    fl.agents["lan"].kill()  # the tracker's memory goes with it
    fl.start_proxy("lan", port=int(edge.rpartition(":")[2]))
    fl.wait_online(*NAMES)
    probe.handshake()

    def holders() -> int:
        resp = probe.post("/v1/tracker/lookup", {"chunks": [sha]})
        return int(resp.json()["counts"][sha]) if resp.status_code == 200 else 0

    wait_for(holders, 30, "pp-1 to tell the restarted proxy's tracker the chunks it holds")


def test_an_agent_tells_the_tracker_when_it_removes_an_old_release(fl: Fleet, tmp_path: Path) -> None:
    edge = _edge(fl)
    probe = ChunkClient(edge, enroll_clients(fl, ["pp-probe2"], url=edge)[0])
    fl.start_agent("pp-keep", extra=["--master", edge, "--keep-releases", "1"])
    fl.wait_online("pp-keep")
    (tmp_path / "old").mkdir()
    _, old, _ = _release(fl, tmp_path / "old", ["pp-keep"])
    sha = hashlib.sha256(old[:CHUNK_SIZE]).hexdigest()
    probe.handshake()

    def holders() -> int:
        return int(probe.post("/v1/tracker/lookup", {"chunks": [sha]}).json()["counts"][sha])

    assert holders() == 1
    _release(fl, tmp_path, ["pp-keep"])  # the newer release pushes the old one out
    wait_for(lambda: holders() == 0, 30, "pp-keep to tell the tracker it dropped the old release's chunks")
