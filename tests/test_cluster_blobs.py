"""Blob bytes in PostgreSQL (issue 15, part E): every master serves every artifact chunk.

The store's blob methods on a real PostgreSQL (put, ranges, missing, refusals, two masters
putting one blob at once), BlobStore refusing bytes that do not match their name or a store
that is down, and real masters on one store: a chunk uploaded to A fetched from B as an agent
fetches it, a release made on B of an artifact uploaded to A, a master with an emptied blobs/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
import pytest
from chunkclient import ChunkClient, enroll_clients
from pg import PgServer

from fleet import Fleet, wait_for
from hcsdk.protocol.manifest import CHUNK_SIZE, Manifest
from master.blobs import BlobStore
from master.settings import MasterSettings
from master.store import AgentRecord, StoreThread
from master.store.blob_bytes import BlobBytes, BlobDigestError
from master.store.postgres import PostgresStore, open_postgres
from master.store.postgres_blobs import BLOB_CHUNK, MAX_READ
from master.store.sqlite import open_sqlite


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    s = open_postgres(pg_url)
    try:
        yield s
    finally:
        s.close()


def _blob(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i:i + size] for i in range(0, len(data), size))


def test_only_a_store_with_blob_bytes_claims_the_capability(store: PostgresStore, tmp_path: Path) -> None:
    assert isinstance(store, BlobBytes)
    sqlite = open_sqlite(tmp_path)
    try:
        assert not isinstance(sqlite, BlobBytes)  # SQLite keeps the files
    finally:
        sqlite.close()


def test_put_then_read_any_range(store: PostgresStore) -> None:
    data, sha = _blob(3 * BLOB_CHUNK + 12_345)
    store.put_blob(sha, _pieces(data, 70_001))  # pieces of any size, regrouped by the store
    assert store.has_blob(sha) and store.blob_size(sha) == len(data)
    end = len(data)
    for off, length in [(0, 1), (0, MAX_READ), (BLOB_CHUNK - 5, 10), (BLOB_CHUNK, BLOB_CHUNK),
                        (123, 2 * BLOB_CHUNK + 7), (end - 3, 100), (end, 10), (end + 5, 10), (7, 0)]:
        assert store.read_blob(sha, off, length) == data[off:off + length], (off, length)
    whole = b"".join(store.read_blob(sha, off, BLOB_CHUNK) for off in range(0, end, BLOB_CHUNK))
    assert whole == data


def test_a_missing_blob(store: PostgresStore) -> None:
    sha = "ab" * 32
    assert not store.has_blob(sha) and store.blob_size(sha) is None
    assert store.read_blob(sha, 0, 10) == b""
    assert store.blob_sizes([sha]) == {} and store.blob_sizes([]) == {}
    assert store.delete_blob(sha) is False


def test_bytes_that_do_not_match_their_name_are_never_stored(store: PostgresStore) -> None:
    data, sha = _blob(2 * BLOB_CHUNK + 1)
    other = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(BlobDigestError, match="hash to"):
        store.put_blob(other, _pieces(data, BLOB_CHUNK))
    assert store.blob_size(other) is None and store.read_blob(other, 0, 10) == b""
    with pytest.raises(BlobDigestError, match="empty"):
        store.put_blob(hashlib.sha256(b"").hexdigest(), [])
    # one flipped bit in the last piece, after two good ones were written: all rolled back
    bad = bytearray(data)
    bad[-1] ^= 1
    with pytest.raises(BlobDigestError):
        store.put_blob(sha, _pieces(bytes(bad), BLOB_CHUNK))
    assert store.blob_sizes([sha, other]) == {}
    store.put_blob(sha, [data])  # the right bytes still go in afterwards
    assert store.read_blob(sha, 0, 16) == data[:16]


def test_a_blob_put_twice_or_by_two_masters_at_once_is_stored_once(store: PostgresStore, pg_url: str) -> None:
    data, sha = _blob(2 * BLOB_CHUNK)
    second = open_postgres(pg_url)  # another master on the same database
    errors: list[BaseException] = []

    def put(s: PostgresStore) -> None:
        try:
            s.put_blob(sha, _pieces(data, 4096))
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=put, args=(s,)) for s in (store, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        store.put_blob(sha, [b"ignored: the blob is there already"])
        assert second.blob_size(sha) == len(data) and second.read_blob(sha, 0, MAX_READ) == data
        assert store.delete_blob(sha) and not second.has_blob(sha)
        assert second.read_blob(sha, 0, 10) == b""  # its pieces went with it
    finally:
        second.close()


def test_reads_are_bounded(store: PostgresStore) -> None:
    data, sha = _blob(100)
    store.put_blob(sha, [data])
    with pytest.raises(ValueError, match="at most"):
        store.read_blob(sha, 0, MAX_READ + 1)  # one read never holds more than MAX_READ
    with pytest.raises(ValueError, match="negative"):
        store.read_blob(sha, -1, 10)


class _Hub:
    """What BlobStore reads of the master's hub: the store's thread, settings and counters."""

    def __init__(self, store: Any) -> None:
        self.db = StoreThread(store)
        self.settings = MasterSettings(data_dir=Path("unused"))
        self.stats: dict[str, int] = {}


def test_blobstore_refuses_a_file_that_changed_before_it_was_stored(store: PostgresStore, tmp_path: Path) -> None:
    data, sha = _blob(BLOB_CHUNK + 3)
    blobs = BlobStore(tmp_path / "blobs", _Hub(store))  # type: ignore[arg-type]
    assert blobs.shared is store
    tmp = tmp_path / "received"
    tmp.write_bytes(data[:-1] + b"\0")  # what was hashed on arrival is not what is on disk now
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    assert anyio.run(blobs._share, tmp, sha, send) is False
    assert sent[0]["status"] == 500 and b"changed on the master's disk" in sent[1]["body"]
    assert store.blob_size(sha) is None


def _ca(fleet: Fleet) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(fleet.root / "master" / "ca.pem"))


def _upload(fleet: Fleet, data: bytes) -> str:
    """POST /api/v1/blobs as the SDK does: the blob's SHA-256."""
    with httpx.Client(verify=_ca(fleet), timeout=60) as http:
        resp = http.post(f"{fleet.url}/api/v1/blobs", content=data,
                         headers={"authorization": f"Bearer {fleet.admin_token}"})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["sha256"])


# -- two masters on one store ---------------------------------------------------------------
def _masters(tmp_path: Path, pg_url: str) -> tuple[Fleet, Fleet]:
    args = ["--store", pg_url, "--key-file", str(tmp_path / "cluster.key")]
    a, b = Fleet(tmp_path / "a", args), Fleet(tmp_path / "b", args)
    a.start_master()
    b.start_master()
    return a, b


def test_a_chunk_uploaded_to_one_master_is_served_by_another(tmp_path: Path, pg_url: str) -> None:
    a, b = _masters(tmp_path, pg_url)
    with a, b:
        path = tmp_path / "app.tgz"
        path.write_bytes(os.urandom(CHUNK_SIZE + 777))
        art = a.client.artifacts.upload(path)
        chunks = Manifest.from_dict(a.client.artifacts.get(art["id"])["manifest"]).chunks
        assert not (b.root / "master" / "blobs").exists() or not any((b.root / "master" / "blobs").iterdir())

        # B knows them (the SDK resumes an upload on B without sending them again)
        assert b.client.artifacts.upload(path)["uploaded"] == 0

        state = enroll_clients(a, ["fetcher"], url=a.url)[0]  # enrolled on A (pinned), fetching from B
        client = ChunkClient(b.url, state)
        client.handshake()
        # eight agents asking B at once for each chunk: B reads each from the store once
        for sha in chunks:
            assert {r.status_code for r in client.get_concurrently([sha] * 8)} == {200}
        assert b"".join(client.fetch(sha) for sha in chunks) == path.read_bytes()
        assert b.client.status()["blobs_from_store"] == len(chunks)
        assert "blobs_from_store" not in a.client.status()  # A had every file
        # B kept what it read from the store: its own files, complete
        assert all((b.root / "master" / "blobs" / sha).read_bytes() == client.fetch(sha) for sha in chunks)
        assert not [p for p in (b.root / "master" / "blobs").iterdir() if p.name.startswith(".")]


def test_a_master_with_an_empty_blobs_folder_serves_from_the_store(tmp_path: Path, pg_url: str) -> None:
    a = Fleet(tmp_path / "a", ["--store", pg_url, "--key-file", str(tmp_path / "cluster.key")])
    with a:
        a.start_master()
        data = os.urandom(3 * BLOB_CHUNK + 5)
        sha = _upload(a, data)
        assert sha == hashlib.sha256(data).hexdigest()
        state = enroll_clients(a, ["fetcher"])[0]
        a.master.stop()  # type: ignore[union-attr]
        for p in (a.root / "master" / "blobs").iterdir():
            p.unlink()
        a.start_master(a.port)
        client = ChunkClient(a.url, state)
        client.handshake()
        assert client.fetch(sha) == data
        assert (a.root / "master" / "blobs" / sha).read_bytes() == data  # cached on the way

        # a cache that cannot be written (here: blobs/ is a file) costs the cache, not the download
        a.master.stop()  # type: ignore[union-attr]
        shutil.rmtree(a.root / "master" / "blobs")
        (a.root / "master" / "blobs").write_text("not a folder")
        a.start_master(a.port)
        client.handshake()
        assert client.fetch(sha) == data
        assert "not cached" in a.master.output()  # type: ignore[union-attr]

        # what an agent may send as a name: only a SHA-256 is looked up, anywhere
        for bad in ["../../ca-key.pem", sha.upper(), sha[:-1], f"{sha}' OR '1'='1", "", "cd" * 32]:
            resp = client.get(bad)
            assert resp.status_code == 404 and resp.json()["kind"] == "blob", bad
        with httpx.Client(verify=_ca(a), timeout=10) as http:
            assert http.get(f"{a.url}/v1/blob", params={"sha256": sha}).status_code == 401  # no credential


def test_a_store_that_is_down_answers_503_without_its_details(pg_url: str, tmp_path: Path) -> None:
    store = open_postgres(pg_url)
    data, sha = _blob(1000)
    store.put_blob(sha, [data])
    blobs = BlobStore(tmp_path / "blobs", _Hub(store))  # type: ignore[arg-type]
    store.close()  # as good as PostgreSQL gone: every call fails
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "query_string": f"sha256={sha}".encode(), "headers": []}
    row = cast(AgentRecord, {"uuid": "u"})  # the channel checked the credential already
    anyio.run(blobs.download, scope, receive, send, row)
    assert sent[0]["status"] == 503 and b'"kind":"store"' in sent[1]["body"].replace(b" ", b"")
    assert b"127.0.0.1" not in sent[1]["body"] and b"postgres" not in sent[1]["body"]
    assert not (tmp_path / "blobs").exists() or not any((tmp_path / "blobs").iterdir())


def test_blobs_are_served_again_once_the_store_is_back(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.new_database()
    a = Fleet(tmp_path / "a", ["--store", url, "--key-file", str(tmp_path / "cluster.key")])
    with a:
        a.start_master()
        data, sha = _blob(2000)
        sha = _upload(a, data)
        (a.root / "master" / "blobs" / sha).unlink()
        state = enroll_clients(a, ["fetcher"])[0]
        client = ChunkClient(a.url, state)
        client.handshake()
        pg_server.stop()
        try:
            resp = client.get(sha)  # refused (the credential cannot be checked either), saying nothing of the store
            assert resp.status_code >= 500 and str(pg_server.port) not in resp.text
        finally:
            pg_server.start()
        assert wait_for(lambda: client.get(sha).status_code == 200, 30, "the blob once the store is back")
        assert client.fetch(sha) == data and (a.root / "master" / "blobs" / sha).read_bytes() == data


def test_a_release_of_an_artifact_uploaded_to_a_reaches_an_agent_on_b(tmp_path: Path, pg_url: str) -> None:
    a, b = _masters(tmp_path, pg_url)
    with a, b:
        data = os.urandom(CHUNK_SIZE + 4321)
        (tmp_path / "app.tgz").write_bytes(data)
        art = a.client.artifacts.upload(tmp_path / "app.tgz")["id"]
        b.start_agent("on-b", extra=["--master", b.url])
        b.wait_online("on-b")
        srv = tmp_path / "srv"
        srv.mkdir()
        rel = b.client.release(art, ["on-b"], dest=f"{srv}/{{hostname}}.tgz")
        rel.wait(timeout=120)
        assert rel.state == "done", rel.info["message"]
        assert (srv / "on-b.tgz").read_bytes() == data
        assert b.client.status()["blobs_from_store"] == 2  # B read each chunk from the store, once
