"""The origin: artifacts uploaded as chunks with a manifest, resumable, deduplicated, checked."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from fleet import ZY, Fleet
from hcsdk import RequestError, UsageError
from hcsdk.protocol.manifest import CHUNK_SIZE, Manifest, ManifestError, build_manifest


class Interrupted(Exception):
    pass


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_upload_is_chunked_resumable_and_deduplicated(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client
    path = _file(tmp_path / "app-1.0.tgz", 2 * CHUNK_SIZE + 123)

    def stop_after_first(done: int, total: int) -> None:
        if done >= CHUNK_SIZE:
            raise Interrupted

    with pytest.raises(Interrupted):
        client.artifacts.upload(path, progress=stop_after_first)
    art = client.artifacts.upload(path)
    assert art["uploaded"] == CHUNK_SIZE + 123  # the first chunk was on the master already
    assert art["size"] == path.stat().st_size and art["chunks"] == 3
    assert art["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    again = client.artifacts.upload(path)
    assert again["uploaded"] == 0 and again["id"] == art["id"]

    got = client.artifacts.get("app-1.0.tgz")
    manifest = Manifest.from_dict(got["manifest"])
    assert manifest.digest() == art["id"] == build_manifest(path).digest()
    blobs = fleet.root / "master" / "blobs"
    assert b"".join((blobs / sha).read_bytes() for sha in manifest.chunks) == path.read_bytes()
    listing = client.artifacts.list()
    assert list(listing["name"]) == ["app-1.0.tgz"] and isinstance(listing.loc[0, "created_at"], pd.Timestamp)


def test_a_new_version_sends_only_the_chunks_that_changed(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client
    old = _file(tmp_path / "v1.bin", 3 * CHUNK_SIZE)
    client.artifacts.upload(old, name="app.bin")
    data = bytearray(old.read_bytes())
    data[CHUNK_SIZE + 5] ^= 0xFF
    new = tmp_path / "v2.bin"
    new.write_bytes(bytes(data))
    art = client.artifacts.upload(new, name="app.bin")
    assert art["uploaded"] == CHUNK_SIZE
    assert client.artifacts.get("app.bin")["id"] == art["id"]  # by name: the newest


def test_bad_manifests_and_changing_files_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client
    path = _file(tmp_path / "x.bin", CHUNK_SIZE + 1)
    manifest = build_manifest(path)
    with pytest.raises(RequestError, match="2 of 2 chunks are not on the master"):
        _register(fleet, manifest.to_dict())
    with pytest.raises(RequestError, match="bad manifest: a file of 5 bytes"):
        _register(fleet, {**manifest.to_dict(), "size": 5})

    def change(done: int, total: int) -> None:
        if done == 0:
            path.write_bytes(os.urandom(CHUNK_SIZE + 1))

    with pytest.raises(UsageError, match="changed while it was uploaded"):
        client.artifacts.upload(path, progress=change)
    with pytest.raises(ManifestError, match="plain file name"):
        Manifest(name="../x", size=0, sha256="0" * 64, chunk_size=CHUNK_SIZE, chunks=())


def _register(fleet: Fleet, manifest: dict[str, object]) -> object:
    from hcsdk._portal import portal

    link = fleet.client._async._link  # a raw request the SDK would refuse to make
    return portal().call(lambda: link.request("POST", "/api/v1/artifacts", json={"manifest": manifest}))


def test_zy_artifact_upload_and_list(fleet: Fleet, tmp_path: Path) -> None:
    path = _file(tmp_path / "tool.tgz", 1000)
    env = {**fleet.env, "ZY_CONFIG": str(fleet.config_path), "COLUMNS": "200"}
    res = subprocess.run([*ZY, "artifact", "upload", str(path), "--output", "json"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    row = pd.read_json(io.StringIO(res.stdout), lines=True).iloc[0]
    assert row["name"] == "tool.tgz" and row["size"] == 1000 and row["uploaded"] == 1000
    res = subprocess.run([*ZY, "artifact", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and "tool.tgz" in res.stdout
