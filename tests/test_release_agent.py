"""An agent receiving a release: chunks fetched by hash through its proxy and checked against
the signed manifest, resumed from what it has, placed atomically, rolled back byte for byte."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleet import Fleet, wait_for
from hcsdk.protocol.manifest import CHUNK_SIZE


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("rel-agent"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    fleet.start_agent("r-1", extra=["--master", fleet.start_proxy("edge")])
    fleet.start_agent("r-2")
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


def _artifact(fl: Fleet, tmp_path: Path, size: int, name: str = "app.tgz") -> tuple[dict[str, Any], bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    art = fl.client.artifacts.upload(path)
    return fl.client.artifacts.get(art["id"]), data


def _run(fl: Fleet, cmd: str, target: str, **args: Any) -> dict[str, Any]:
    df = fl.client.run(cmd=cmd, args=args, targets=target, timeout=120).to_dataframe()
    return dict(df.iloc[0])


def test_fetch_place_and_roll_back(fl: Fleet, tmp_path: Path) -> None:
    v1, data1 = _artifact(fl, tmp_path, 2 * CHUNK_SIZE + 77, "v1.tgz")
    got = _run(fl, "zy.release.fetch", "r-1", manifest=v1["manifest"], digest=v1["id"])
    assert got["status"] == "ok", got["error"]
    assert got["result"]["bytes_upstream"] == len(data1) and got["result"]["reused"] == 0
    assert Path(got["result"]["path"]).read_bytes() == data1

    dest = tmp_path / "srv" / "app.tgz"
    dest.parent.mkdir()
    dest.write_bytes(b"the version before")
    placed = _run(fl, "zy.release.place", "r-1", digest=v1["id"], dest=str(dest))
    assert placed["status"] == "ok" and placed["result"]["previous_kept"]
    assert dest.stat().st_ino == Path(got["result"]["path"]).stat().st_ino  # linked: written once, not copied
    assert dest.read_bytes() == data1 and (dest.parent / "app.tgz.zy-prev").read_bytes() == b"the version before"

    assert _run(fl, "zy.release.place", "r-1", digest=v1["id"], dest=str(dest))["result"]["unchanged"]
    other = _run(fl, "zy.release.rollback", "r-1", dest=str(dest), digest="e" * 64)
    assert other["status"] == "error" and "was not placed by this release" in other["error"]
    rolled = _run(fl, "zy.release.rollback", "r-1", dest=str(dest), digest=v1["id"])
    assert rolled["status"] == "ok" and dest.read_bytes() == b"the version before"
    again = _run(fl, "zy.release.rollback", "r-1", dest=str(dest), digest=v1["id"])  # a restarted master asks again
    assert again["status"] == "ok" and again["result"]["already"] and dest.read_bytes() == b"the version before"


def test_a_second_fetch_reuses_chunks_and_heals_damaged_ones(fl: Fleet, tmp_path: Path) -> None:
    art, data = _artifact(fl, tmp_path, 3 * CHUNK_SIZE)
    first = _run(fl, "zy.release.fetch", "r-2", manifest=art["manifest"], digest=art["id"])
    assert first["status"] == "ok" and first["result"]["reused"] == 0
    path = Path(first["result"]["path"])
    with open(path, "r+b") as fh:  # bit rot in chunk 1 of the fetched file
        fh.seek(CHUNK_SIZE + 5)
        fh.write(b"bit rot")
    healed = _run(fl, "zy.release.fetch", "r-2", manifest=art["manifest"], digest=art["id"])
    assert healed["status"] == "ok" and healed["result"]["reused"] == 2
    assert healed["result"]["bytes_upstream"] == CHUNK_SIZE and path.read_bytes() == data

    part = path.with_name(f".{path.name}.zy-part")  # as if the agent died with only chunk 0 written
    path.rename(part)
    with open(part, "r+b") as fh:
        fh.seek(CHUNK_SIZE)
        fh.write(bytes(2 * CHUNK_SIZE))
    resumed = _run(fl, "zy.release.fetch", "r-2", manifest=art["manifest"], digest=art["id"])
    assert resumed["status"] == "ok" and resumed["result"]["reused"] == 1
    assert resumed["result"]["bytes_upstream"] == 2 * CHUNK_SIZE
    assert path.read_bytes() == data and not part.exists()


def test_chunks_travel_on_a_connection_beside_the_channel(fl: Fleet, tmp_path: Path) -> None:
    """Megabytes queued on the channel's HTTP/2 connection would hold its PINGs behind them on a
    thin link: an agent fetches chunks on HTTP/1.1 connections of their own to the same proxy."""
    art, _ = _artifact(fl, tmp_path, CHUNK_SIZE + 1, "side.bin")
    assert _run(fl, "zy.release.fetch", "r-1", manifest=art["manifest"], digest=art["id"])["status"] == "ok"
    proxy = psutil.Process(fl.agents["edge"].popen.pid)
    proxy_port = next(c.laddr.port for c in proxy.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
    agent = psutil.Process(fl.agents["r-1"].popen.pid)
    to_proxy = [c for c in agent.net_connections("tcp") if c.raddr and c.raddr.port == proxy_port
                and c.status == psutil.CONN_ESTABLISHED]
    assert len(to_proxy) >= 2


def test_a_chunk_twice_in_a_file_is_fetched_once_and_written_at_both_offsets(fl: Fleet, tmp_path: Path) -> None:
    block = os.urandom(CHUNK_SIZE)
    data = block + os.urandom(CHUNK_SIZE) + block + b"tail"
    (tmp_path / "twice.bin").write_bytes(data)
    art = fl.client.artifacts.get(fl.client.artifacts.upload(tmp_path / "twice.bin")["id"])
    got = _run(fl, "zy.release.fetch", "r-1", manifest=art["manifest"], digest=art["id"])
    assert got["status"] == "ok" and got["result"]["chunks"] == 3
    assert got["result"]["bytes_upstream"] == 2 * CHUNK_SIZE + 4
    assert Path(got["result"]["path"]).read_bytes() == data


def test_a_manifest_that_does_not_match_its_digest_is_refused(fl: Fleet, tmp_path: Path) -> None:
    art, _ = _artifact(fl, tmp_path, 1000)
    trap = tmp_path / "trap"
    trap.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"must stay")
    for name in (".app.tgz.zy-new", ".app.tgz.zy-release"):
        (trap / name).symlink_to(victim)  # planted by someone who can write the directory
    assert _run(fl, "zy.release.fetch", "r-2", manifest=art["manifest"], digest=art["id"])["status"] == "ok"
    placed = _run(fl, "zy.release.place", "r-2", digest=art["id"], dest=str(trap / "app.tgz"))
    assert placed["status"] == "ok" and victim.read_bytes() == b"must stay"
    swapped = {**art["manifest"], "sha256": "0" * 64}
    got = _run(fl, "zy.release.fetch", "r-2", manifest=swapped, digest=art["id"])
    assert got["status"] == "error" and "the signed command says" in got["error"]
    bad_dest = _run(fl, "zy.release.place", "r-2", digest=art["id"], dest="/proc/self/x")
    assert bad_dest["status"] == "error" and "is not allowed" in bad_dest["error"]
    unfetched = _run(fl, "zy.release.place", "r-2", digest="f" * 64, dest=str(tmp_path / "x"))
    assert "has not been fetched on this agent" in unfetched["error"]


def test_only_the_newest_releases_are_kept_and_placed_files_stay(fl: Fleet, tmp_path: Path) -> None:
    arts = [_artifact(fl, tmp_path, 1000 + i, f"keep{i}.tgz") for i in range(4)]
    releases = fl.root / "agents" / "r-2" / "releases"
    dest = tmp_path / "keep.tgz"
    for i, (art, _) in enumerate(arts):
        assert _run(fl, "zy.release.fetch", "r-2", manifest=art["manifest"], digest=art["id"])["status"] == "ok"
        if i == 0:
            assert _run(fl, "zy.release.place", "r-2", digest=art["id"], dest=str(dest))["status"] == "ok"
    assert sorted(p.name for p in releases.iterdir()) == sorted(a["id"][:16] for a, _ in arts[1:])  # default 3
    assert dest.read_bytes() == arts[0][1]  # its release file went; the placed link stays


def test_an_agent_killed_mid_download_resumes_from_the_chunks_it_has(fl: Fleet, tmp_path: Path) -> None:
    art, data = _artifact(fl, tmp_path, 4 * CHUNK_SIZE, "resume.bin")
    part = fl.root / "agents" / "r-2" / "releases" / art["id"][:16] / ".resume.bin.zy-part"
    # one transfer at a time, at most half a chunk a second: the agent dies after a chunk or two
    fl.client.run(cmd="zy.release.fetch", args={"manifest": art["manifest"], "digest": art["id"], "parallel": 1,
                                                "rate": CHUNK_SIZE / 2}, targets="r-2", timeout=60)
    wait_for(lambda: part.exists() and part.stat().st_blocks * 512 >= CHUNK_SIZE, 60, "the first chunk on disk")
    fl.agents["r-2"].kill()
    fl.start_agent("r-2")
    fl.wait_online("r-2")
    got = _run(fl, "zy.release.fetch", "r-2", manifest=art["manifest"], digest=art["id"])
    assert got["status"] == "ok" and 1 <= got["result"]["reused"] < 4
    assert got["result"]["bytes_upstream"] == (4 - got["result"]["reused"]) * CHUNK_SIZE
    assert Path(got["result"]["path"]).read_bytes() == data
