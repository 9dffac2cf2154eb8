"""Sharded rollouts on real agents behind a proxy: shards with a health gate, pause on the
failure threshold, rollback byte for byte, and a master restart in the middle."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import Fleet, wait_for
from hcsdk import RequestError, UsageError

NAMES = ("rl-1", "rl-2", "rl-3", "rl-4")


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("release"), ["--offline-grace", "5", "--heartbeat", "2"])
    fleet.start_master()
    edge = fleet.start_proxy("edge")
    for name in NAMES:
        fleet.start_agent(name, {"role": "rel"}, extra=["--master", edge])
    try:
        fleet.wait_online()
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def artifact(fl: Fleet, tmp_path: Path) -> tuple[str, bytes]:
    data = os.urandom(5 * 1024 * 1024 + 321)
    path = tmp_path / "app.tgz"
    path.write_bytes(data)
    return fl.client.artifacts.upload(path)["id"], data


def _dests(tmp_path: Path) -> Path:
    srv = tmp_path / "srv"
    srv.mkdir()
    return srv


def test_a_sharded_release_with_a_health_gate(fl: Fleet, artifact: tuple[str, bytes], tmp_path: Path) -> None:
    art, data = artifact
    srv = _dests(tmp_path)
    rel = fl.client.release(art, "label:role=rel", dest=f"{srv}/{{hostname}}.tgz", batch="50%",
                            pre=f"echo $ZY_HOSTNAME >> {srv}/pre.log", health=f"test -s {srv}/$ZY_HOSTNAME.tgz")
    rel.wait(timeout=120)
    assert rel.state == "done", rel.info["message"]
    df = rel.progress()
    assert list(df["status"]) == ["ok"] * 4 and list(df["phase"]) == ["done"] * 4
    assert sorted(df["shard"]) == [0, 0, 1, 1]
    assert set(df["bytes"]) == {len(data)} and set(df["bytes_upstream"] + df["bytes_peers"]) == {len(data)}
    # the second shard took what the first had from its peers, not from the proxy
    assert set(df[df["shard"] == 1]["bytes_peers"]) == {len(data)}
    for name in NAMES:
        assert (srv / f"{name}.tgz").read_bytes() == data
    assert sorted((srv / "pre.log").read_text().split()) == sorted(NAMES)
    assert (df["duration_s"] > 0).all()


def test_the_release_pauses_over_the_failure_threshold(fl: Fleet, artifact: tuple[str, bytes],
                                                      tmp_path: Path) -> None:
    art, data = artifact
    srv = _dests(tmp_path)
    rel = fl.client.release(art, list(NAMES), dest=f"{srv}/{{hostname}}.tgz", batch=1, max_failures=0,
                            health='[ "$ZY_HOSTNAME" != rl-2 ]')
    rel.wait(timeout=120)
    assert rel.state == "paused" and "more than 0 target(s) failed" in rel.info["message"]
    df = rel.progress().set_index("hostname")
    assert df.loc["rl-1", "status"] == "ok" and df.loc["rl-2", "status"] == "failed"
    assert str(df.loc["rl-2", "error"]).startswith("health: ")
    assert set(df.loc[["rl-3", "rl-4"], "status"]) == {"pending"}
    assert not (srv / "rl-3.tgz").exists()  # the next shard did not start
    rel.resume().wait(timeout=120)
    assert rel.state == "done"
    assert (srv / "rl-4.tgz").read_bytes() == data
    with pytest.raises(RequestError, match="is done: it cannot resume now"):
        rel.resume()


def test_rollback_restores_the_previous_file_byte_for_byte(fl: Fleet, artifact: tuple[str, bytes],
                                                          tmp_path: Path) -> None:
    art, data = artifact
    srv = _dests(tmp_path)
    old = {name: os.urandom(1000) for name in NAMES}
    for name, content in old.items():
        (srv / f"{name}.tgz").write_bytes(content)
    rel = fl.client.release(art, "label:role=rel", dest=f"{srv}/{{hostname}}.tgz", batch=4,
                            rollback=f"touch {srv}/$ZY_HOSTNAME.rolled-back")
    rel.wait(timeout=120)
    assert rel.state == "done" and (srv / "rl-1.tgz").read_bytes() == data
    rel.rollback().wait(timeout=120)
    assert rel.state == "rolled_back", rel.info["message"]
    for name, content in old.items():
        assert (srv / f"{name}.tgz").read_bytes() == content
        assert (srv / f"{name}.rolled-back").exists()
    assert set(rel.progress()["status"]) == {"rolled_back"}


def test_a_release_carries_on_after_a_master_restart(fl: Fleet, artifact: tuple[str, bytes], tmp_path: Path) -> None:
    art, data = artifact
    srv = _dests(tmp_path)
    rel = fl.client.release(art, ["rl-1", "rl-2"], dest=f"{srv}/{{hostname}}.tgz", batch=1, pause_between="4s")
    wait_for(lambda: (srv / "rl-1.tgz").exists(), what="the first shard")
    fl.restart_master()
    fl.wait_online(*NAMES, timeout=60)
    rel.wait(timeout=120)
    assert rel.state == "done"
    assert (srv / "rl-2.tgz").read_bytes() == data
    assert list(rel.progress()["status"]) == ["ok", "ok"]


def test_bad_releases_are_clear_errors(fl: Fleet, artifact: tuple[str, bytes]) -> None:
    art, _ = artifact
    with pytest.raises(RequestError, match="no artifact 'nope'"):
        fl.client.release("nope", "rl-1", dest="/tmp/x")
    with pytest.raises(RequestError, match="batch='half'"):
        fl.client.release(art, "rl-1", dest="/tmp/x", batch="half")
    with pytest.raises(UsageError, match="must be an absolute path"):
        fl.client.release(art, "rl-1", dest="relative/x")


def test_a_proxy_restart_in_the_middle_loses_nothing(fl: Fleet, artifact: tuple[str, bytes], tmp_path: Path) -> None:
    art, data = artifact
    srv = _dests(tmp_path)
    rel = fl.client.release(art, ["rl-1", "rl-2", "rl-3"], dest=f"{srv}/{{hostname}}.tgz", batch=1,
                            pause_between="3s")
    wait_for(lambda: (srv / "rl-1.tgz").exists(), what="the first shard")
    edge = fl.agents["edge"]
    port = int(edge.output().split("listening on https://127.0.0.1:")[1].split()[0])
    edge.kill()  # every agent behind it loses its channel; the proxy's cache survives on disk
    fl.start_proxy("edge", port=port)
    rel.wait(timeout=180)
    assert rel.state == "done", rel.info["message"]
    for name in ("rl-1", "rl-2", "rl-3"):
        assert (srv / f"{name}.tgz").read_bytes() == data
    assert list(rel.progress()["status"]) == ["ok", "ok", "ok"]
