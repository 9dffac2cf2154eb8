"""Issue 15, shared PKI: masters on one PostgreSQL store share the CA, the proxy CA, the
end-to-end key and the admin token, sealed in the store's meta under the cluster key file.

Real master and agent processes on a throwaway PostgreSQL (`pg_url`). The attacks: a wrong key
file, a key file other users may read, a sealed value with a flipped byte, a sealed value moved
under another name, a missing key file: each stops the master with exit 2 and a message naming
what is wrong, and leaves the store's secrets as they were (never made again).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from fleet import ZY, Fleet, Proc, wait_for
from hcsdk import Client
from master.keyring import Unsealable, seal, unseal

SEALED = ("keyring_check", "sealed.ca", "sealed.proxy_ca", "sealed.e2e_key", "sealed.admin_token", "sealed.complete")


# -- helpers: a second master on the same store (until tests/fleet.py starts several) -------------

def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZY_")}
    return {**env, "XDG_CONFIG_HOME": str(root / "xdg"), "PYTHONUNBUFFERED": "1"}


def _argv(data_dir: Path, store: str, key_file: Path | None) -> list[str]:
    return [*ZY, "master", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--no-user-config",
            "--store", store, *(["--key-file", str(key_file)] if key_file else [])]


def _wait_listening(proc: Proc) -> str:
    """The URL ``proc`` (a master) listens on, once it says so."""
    def listening() -> re.Match[str] | None:
        if not proc.alive:
            raise AssertionError(f"master {proc.name} exited:\n{proc.output()}")
        return re.search(r"listening on (https://\S+)", proc.output())

    match = wait_for(listening, 60, f"master {proc.name} to listen")
    return f"https://127.0.0.1:{match.group(1).rsplit(':', 1)[1]}"


class Master:
    """One master process on ``store``, its data dir ``root/name``."""

    def __init__(self, root: Path, name: str, store: str, key_file: Path | None = None):
        self.data = root / name
        self.proc = Proc(name, _argv(self.data, store, key_file), root / f"{name}.log", _env(root))
        self.url = _wait_listening(self.proc)

    @property
    def token(self) -> str:
        import tomllib

        return str(tomllib.loads((self.data / "client.toml").read_text())["token"])

    def client(self, token: str | None = None, ca: Path | None = None) -> Client:
        return Client(self.url, token=token or self.token, ca=str(ca or self.data / "ca.pem"))

    def stop(self) -> None:
        self.proc.stop()


def _refused(root: Path, name: str, store: str, key_file: Path | None) -> subprocess.CompletedProcess[str]:
    """A master that must not start: its exit and what it said."""
    return subprocess.run(_argv(root / name, store, key_file), capture_output=True, text=True, timeout=90,
                          env=_env(root))


def _copy_key(src: Path, dst: Path, mode: int = 0o600) -> Path:
    """What the operator does: copy the first master's key file to the next one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)
    return dst


def _meta(url: str, tmp: Path) -> dict[str, str | None]:
    """The store's sealed values, read through the store's own interface."""
    from master.store import open_store

    store = open_store(tmp, url)
    try:
        return {k: store.get_meta(k) for k in (*SEALED, "admin_token_hash")}
    finally:
        store.close()


def _set_meta(url: str, tmp: Path, key: str, value: str) -> None:
    from master.store import open_store

    store = open_store(tmp, url)
    try:
        store.set_meta(key, value)
    finally:
        store.close()


def _agent_key(url: str, tmp: Path, uuid: str) -> bytes:
    from master.store import open_store

    store = open_store(tmp, url)
    try:
        row = store.agent(uuid)
        assert row is not None
        return bytes(row["e2e_key"])
    finally:
        store.close()


@pytest.fixture
def first(tmp_path: Path, pg_url: str) -> Iterator[Master]:
    """The first master of a new store: it makes the key file (DATA_DIR/cluster.key) and the secrets."""
    master = Master(tmp_path, "a", pg_url)
    try:
        yield master
    finally:
        master.stop()


# -- a second master joins --------------------------------------------------------------------------

def test_the_first_master_makes_the_key_file_and_says_which_file_to_copy(first: Master, pg_url: str,
                                                                         tmp_path: Path) -> None:
    key = first.data / "cluster.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(base64.b64decode(key.read_text().strip(), validate=True)) == 32
    out = first.proc.output()
    assert f"key file:      {key.resolve()} (made now): copy this file" in out, out
    assert re.fullmatch(r"m-[0-9a-f]{8}", (first.data / "master.id").read_text().strip())
    meta = _meta(pg_url, tmp_path / "peek")
    assert all(meta[k] for k in SEALED), meta
    for name in SEALED:  # a reader of the database gets ciphertext, not the PEM or the token
        assert str(meta[name]).startswith("v1:")
    for secret in (first.data / "ca.key", first.data / "e2e.key", first.data / "admin.token"):
        assert secret.read_bytes() not in str(meta).encode()
        assert base64.b64encode(secret.read_bytes()).decode() not in str(meta)


def test_a_second_master_with_the_same_store_and_key_file_joins_with_the_first_ones_ca_and_token(
        first: Master, pg_url: str, tmp_path: Path) -> None:
    key = _copy_key(first.data / "cluster.key", tmp_path / "keys" / "b.key")
    second = Master(tmp_path, "b", pg_url, key)
    try:
        assert "joined:" in second.proc.output() and "(made now)" not in second.proc.output()
        for name in ("ca.pem", "ca.key", "proxy-ca.pem", "proxy-ca.key", "e2e.key", "admin.token"):
            assert (second.data / name).read_bytes() == (first.data / name).read_bytes(), name
        for name in ("ca.key", "proxy-ca.key", "e2e.key", "admin.token", "server.key"):
            assert (second.data / name).stat().st_mode & 0o777 == 0o600, name
        # its own server certificate, from the shared CA
        ca = x509.load_pem_x509_certificate((first.data / "ca.pem").read_bytes())
        own = x509.load_pem_x509_certificate((second.data / "server.pem").read_bytes())
        own.verify_directly_issued_by(ca)
        assert (second.data / "server.key").read_bytes() != (first.data / "server.key").read_bytes()
        assert (second.data / "master.id").read_text() != (first.data / "master.id").read_text()
        # one admin token for the cluster: B's client.toml works against both masters
        assert second.token == first.token
        for master in (first, second):
            with master.client(token=second.token, ca=second.data / "ca.pem") as client:
                assert client.inventory() is not None
    finally:
        second.stop()


def test_two_masters_starting_at_once_on_a_new_store_end_with_one_set_of_secrets(tmp_path: Path,
                                                                                 pg_url: str) -> None:
    """Same key file path (one host): one makes it, the other reads it; first writer wins on
    every secret, and both re-read: the same CA, token and e2e key."""
    key = tmp_path / "shared" / "cluster.key"
    procs = [Proc(n, _argv(tmp_path / n, pg_url, key), tmp_path / f"{n}.log", _env(tmp_path)) for n in ("a", "b")]
    try:
        for proc in procs:
            _wait_listening(proc)
        for name in ("ca.pem", "ca.key", "proxy-ca.key", "e2e.key", "admin.token"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert sum("first start:" in p.output() for p in procs) == 1, [p.output() for p in procs]
    finally:
        for proc in procs:
            proc.stop()


def test_an_agent_enrolled_on_one_master_handshakes_with_the_other(tmp_path: Path, pg_url: str) -> None:
    fleet = Fleet(tmp_path / "fleet", ["--store", pg_url])
    fleet.start_master()
    second: Master | None = None
    try:
        fleet.start_agent("roamer")
        fleet.wait_online("roamer", timeout=40)
        # the agent's MAC key is in the store sealed (a database reader on a proxy host cannot forge)
        mac_key = bytes.fromhex(json.loads((fleet.root / "agents" / "roamer" / "identity.json").read_text())["e2e_key"])
        stored = _agent_key(pg_url, tmp_path / "peek", fleet.uuid_of("roamer"))
        assert stored.startswith(b"v1:") and mac_key not in stored and mac_key.hex().encode() not in stored
        key = _copy_key(fleet.root / "master" / "cluster.key", tmp_path / "b.key")
        second = Master(tmp_path, "b", pg_url, key)
        fleet.agents.pop("roamer").stop()
        # the same identity, pointed at B: B's certificate is from the CA the agent pinned, and
        # B derives the same end-to-end key (the e2e key is the cluster's)
        fleet.start_agent("roamer", extra=["--master", second.url])
        with second.client() as client:
            wait_for(lambda: "roamer" in set(client.inventory().query("online")["hostname"]), 40, "roamer on B")
            df = client.run("echo via-b", targets="roamer", timeout=30).to_dataframe()
        assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "via-b\n", df.to_dict("records")
    finally:
        fleet.close()
        if second is not None:
            second.stop()


# -- attacks: the wrong key, a readable key, a changed or moved value, no key ------------------------------------

def test_a_master_with_the_wrong_key_file_exits_2_and_changes_nothing(first: Master, pg_url: str,
                                                                      tmp_path: Path) -> None:
    before = _meta(pg_url, tmp_path / "peek")
    wrong = tmp_path / "keys" / "wrong.key"
    wrong.parent.mkdir()
    wrong.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    os.chmod(wrong, 0o600)
    res = _refused(tmp_path, "b", pg_url, wrong)
    assert res.returncode == 2, res
    assert f"the key file {wrong} does not open this store's secrets (copy the first master's key file)" in res.stderr
    assert "Traceback" not in res.stderr
    assert _meta(pg_url, tmp_path / "peek") == before
    assert not any((tmp_path / "b" / n).exists() for n in ("ca.pem", "ca.key", "e2e.key", "admin.token"))
    assert wrong.exists()  # the operator's file is theirs: never replaced or removed


def test_a_key_file_other_users_may_read_is_refused(first: Master, pg_url: str, tmp_path: Path) -> None:
    key = _copy_key(first.data / "cluster.key", tmp_path / "keys" / "b.key", 0o644)
    res = _refused(tmp_path, "b", pg_url, key)
    assert res.returncode == 2, res
    assert f"the key file {key} is open to other users (mode 0644)" in res.stderr and f"chmod 600 {key}" in res.stderr
    assert not (tmp_path / "b" / "ca.key").exists()


def test_a_missing_key_file_on_a_store_with_secrets_is_refused_not_made(first: Master, pg_url: str,
                                                                         tmp_path: Path) -> None:
    before = _meta(pg_url, tmp_path / "peek")
    res = _refused(tmp_path, "b", pg_url, None)  # default DATA_DIR/cluster.key: not there
    assert res.returncode == 2, res
    assert f"the key file {tmp_path / 'b' / 'cluster.key'} does not exist" in res.stderr
    assert "copy the first master's key file" in res.stderr
    assert not (tmp_path / "b" / "cluster.key").exists()
    assert _meta(pg_url, tmp_path / "peek") == before


def _flip(sealed: str, at: int) -> str:
    raw = bytearray(base64.b64decode(sealed[3:]))
    raw[at] ^= 0x01
    return "v1:" + base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_a_sealed_ca_with_a_flipped_byte_stops_the_master_naming_it_and_is_never_made_again(
        first: Master, pg_url: str, tmp_path: Path, where: str) -> None:
    first.stop()
    meta = _meta(pg_url, tmp_path / "peek")
    sealed = str(meta["sealed.ca"])
    at = {"nonce": 3, "ciphertext": 40, "tag": -2}[where]
    tampered = _flip(sealed, at)
    _set_meta(pg_url, tmp_path / "peek", "sealed.ca", tampered)
    ca_before = (first.data / "ca.pem").read_bytes()
    res = _refused(tmp_path, "a", pg_url, None)  # the first master itself, restarted
    assert res.returncode == 2, res
    assert "the store's secret sealed.ca does not open" in res.stderr and "changed" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    after = _meta(pg_url, tmp_path / "peek")
    assert after["sealed.ca"] == tampered and {**after, "sealed.ca": sealed} == meta  # nothing regenerated
    assert (first.data / "ca.pem").read_bytes() == ca_before


def test_a_sealed_value_moved_under_another_name_does_not_open(first: Master, pg_url: str,
                                                                tmp_path: Path) -> None:
    """The proxy CA's sealed pair put where the master CA's belongs (a store writer who wants
    the SDK to trust the proxy CA): the name is the associated data, so it does not open."""
    first.stop()
    meta = _meta(pg_url, tmp_path / "peek")
    _set_meta(pg_url, tmp_path / "peek", "sealed.ca", str(meta["sealed.proxy_ca"]))
    key = _copy_key(first.data / "cluster.key", tmp_path / "keys" / "b.key")
    res = _refused(tmp_path, "b", pg_url, key)
    assert res.returncode == 2 and "the store's secret sealed.ca does not open" in res.stderr, res
    assert not (tmp_path / "b" / "ca.pem").exists()


def test_an_emptied_secret_is_not_made_again(first: Master, pg_url: str, tmp_path: Path) -> None:
    """A secret blanked in the store is refused, not replaced: a new key would strand every agent."""
    first.stop()
    _set_meta(pg_url, tmp_path / "peek", "sealed.e2e_key", "")
    res = _refused(tmp_path, "a", pg_url, None)
    assert res.returncode == 2 and "sealed.e2e_key" in res.stderr, res


def test_a_data_dir_with_another_ca_is_refused_not_overwritten(first: Master, pg_url: str, tmp_path: Path) -> None:
    """A data dir that was a master of its own: joining would overwrite its CA; refuse instead."""
    other = Fleet(tmp_path / "other")
    other.start_master()
    other.close()
    ca = (other.root / "master" / "ca.pem").read_bytes()
    key = _copy_key(first.data / "cluster.key", tmp_path / "keys" / "b.key")
    res = subprocess.run(_argv(other.root / "master", pg_url, key), capture_output=True, text=True, timeout=90,
                         env=_env(tmp_path))
    assert res.returncode == 2 and "is not the cluster's" in res.stderr and "new --data-dir" in res.stderr, res
    assert (other.root / "master" / "ca.pem").read_bytes() == ca


def test_an_agents_sealed_key_moved_to_another_agents_row_is_refused(tmp_path: Path, pg_url: str) -> None:
    """A store writer copies agent one's sealed MAC key into agent two's row: the key is sealed
    for its uuid, so agent two's next handshake is refused (403), not keyed with one's key."""
    from master.store import open_store

    fleet = Fleet(tmp_path / "fleet", ["--store", pg_url])
    fleet.start_master()
    try:
        for name in ("one", "two"):
            fleet.start_agent(name)
        fleet.wait_online("one", "two", timeout=40)
        fleet.agents.pop("two").stop()
        one, two = fleet.uuid_of("one"), fleet.uuid_of("two")
        store = open_store(tmp_path / "peek", pg_url)
        try:
            row = store.agent(two)
            assert row is not None
            store.enroll(two, row["credential_hash"], row["token_id"], row["facts"], row["labels"],
                         _agent_key(pg_url, tmp_path / "peek", one), row["kind"] or "agent")
        finally:
            store.close()
        fleet.start_agent("two")
        assert fleet.master is not None
        master = fleet.master
        wait_for(lambda: f"refused handshake of {two}" in master.output(), 40, "two's handshake refused")
        assert "two" not in fleet.online() and "one" in fleet.online()
    finally:
        fleet.close()


# -- the seal itself ----------------------------------------------------------------------------------

def test_seal_round_trips_and_refuses_another_key_name_version_or_length() -> None:
    key, other = os.urandom(32), os.urandom(32)
    sealed = seal(key, "sealed.ca", b"pem")
    assert sealed.startswith("v1:") and unseal(key, "sealed.ca", sealed) == b"pem"
    assert seal(key, "sealed.ca", b"pem") != sealed  # a fresh nonce each time
    for bad_key, name, value in [(other, "sealed.ca", sealed), (key, "sealed.proxy_ca", sealed),
                                 (key, "sealed.ca", "v2:" + sealed[3:]), (key, "sealed.ca", "v1:AAAA"),
                                 (key, "sealed.ca", "v1:not base64!"), (key, "sealed.ca", _flip(sealed, 20))]:
        with pytest.raises(Unsealable):
            unseal(bad_key, name, value)


# -- without --store nothing changes ----------------------------------------------------------------------

def test_without_a_store_there_is_no_key_file_and_key_file_alone_is_refused(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.start_master()
    try:
        data = tmp_path / "master"
        assert not (data / "cluster.key").exists() and (data / "ca.key").exists() and (data / "admin.token").exists()
        assert fleet.master is not None and "key file" not in fleet.master.output()
        assert re.fullmatch(r"m-[0-9a-f]{8}", (data / "master.id").read_text().strip())
    finally:
        fleet.close()
    res = subprocess.run([*ZY, "master", "--data-dir", str(tmp_path / "x"), "--key-file", str(tmp_path / "k")],
                         capture_output=True, text=True, timeout=60, env=_env(tmp_path))
    assert res.returncode == 2 and "--key-file goes with --store" in res.stderr, res
