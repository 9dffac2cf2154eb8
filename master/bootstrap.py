"""First start of a master: data directory, CA, server certificate, admin token, client.toml."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hcsdk.common.config import ClientConfig, user_config_path, write_client_config
from hcsdk.net.serve import StartupError
from hcsdk.net.tls import issue_server_cert, make_ca

from .keyring import KeyringError, Unsealable, open_keyring, seal, unseal
from .store import Store


def secret_hash(secret: str) -> str:
    # secrets are 256-bit random, so a plain digest is enough; no password stretching needed
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Paths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "master.db"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def proxy_ca_cert(self) -> Path:
        return self.root / "proxy-ca.pem"

    @property
    def proxy_ca_key(self) -> Path:
        return self.root / "proxy-ca.key"

    @property
    def server_names(self) -> Path:
        return self.root / "server.names"

    @property
    def cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def key(self) -> Path:
        return self.root / "server.key"

    @property
    def admin_token(self) -> Path:
        return self.root / "admin.token"

    @property
    def e2e_key(self) -> Path:
        return self.root / "e2e.key"

    @property
    def client_config(self) -> Path:
        return self.root / "client.toml"

    @property
    def master_id(self) -> Path:
        return self.root / "master.id"

    @property
    def cluster_key(self) -> Path:
        """The default --key-file (used only with --store)."""
        return self.root / "cluster.key"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_pki(paths: Paths, names: list[str]) -> bool:
    """Create the CAs once; (re)issue the server certificate when the names it must cover change.
    Returns whether the proxy CA was just made (a data dir from before it existed).

    Two CAs, two keys: the master CA signs only the master's own server certificate, and is all
    the SDK trusts; the proxy CA signs proxies' certificates, and agents trust both. So a proxy's
    certificate is never a master's to an SDK client, whatever names it carries."""
    _private_dir(paths)
    if not paths.ca_cert.exists():
        cert, key = make_ca()
        _write_private(paths.ca_key, key)
        paths.ca_cert.write_bytes(cert)
    made_proxy_ca = not paths.proxy_ca_cert.exists()
    if made_proxy_ca:  # also the migration of a data dir from before the proxy CA
        cert, key = make_ca("zy proxy CA")
        _write_private(paths.proxy_ca_key, key)
        paths.proxy_ca_cert.write_bytes(cert)
    ensure_server_cert(paths, names)
    return made_proxy_ca


def _private_dir(paths: Paths) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)


def ensure_server_cert(paths: Paths, names: list[str]) -> None:
    """This master's own server certificate from the CA in the data dir, (re)issued when the
    names it must cover change: with several masters, each issues its own for its own names."""
    names_file = paths.server_names
    wanted = "\n".join(sorted(names))
    if not paths.cert.exists() or not names_file.exists() or names_file.read_text() != wanted:
        cert, key = issue_server_cert(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), names)
        _write_private(paths.key, key)
        paths.cert.write_bytes(cert)
        names_file.write_text(wanted)


def master_only_names(paths: Paths) -> set[str]:
    """The master's own names that no proxy may have a certificate for. Loopback names are left
    out: a proxy on the master's own host legitimately serves them, and reaching them takes a
    foothold on that host already."""
    from hcsdk.net.tls import norm_name

    try:
        names = {norm_name(n) for n in paths.server_names.read_text().split()}
    except OSError:
        return set()
    return {n for n in names if not is_loopback(n)}


def is_loopback(name: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name in ("localhost", "localhost.localdomain")


def ensure_admin_token(store: Store, paths: Paths) -> tuple[str, bool]:
    """The admin token and whether it was just made. It is kept in the data dir (0600, beside
    the CA key, which guards more than it does) so client.toml can always be rewritten; the
    store keeps its hash to check requests against."""
    if paths.admin_token.exists() and store.get_meta("admin_token_hash"):
        return paths.admin_token.read_text().strip(), False
    token = "zya_" + secrets.token_urlsafe(32)
    _write_private(paths.admin_token, token.encode())
    store.set_meta("admin_token_hash", secret_hash(token))
    return token, True


def ensure_e2e_key(paths: Paths) -> bytes:
    """The master's X25519 private key for end-to-end message keys (made once, 0600)."""
    from hcsdk.protocol.e2e import new_keypair

    if not paths.e2e_key.exists():
        private, _ = new_keypair()
        _write_private(paths.e2e_key, private)
    return paths.e2e_key.read_bytes()


def write_client_configs(paths: Paths, url: str, token: str, to_user: bool,
                         urls: Sequence[str] = ()) -> list[Path]:
    """client.toml in the data dir and, unless told not to, in the user's config dir.
    ``urls``: every master's URL (``url`` is put first), so the SDK can fail over between them."""
    targets = [paths.client_config] + ([user_config_path()] if to_user else [])
    for path in targets:
        write_client_config(path, ClientConfig(url=url, urls=tuple(urls), token=token,
                                               ca=str(paths.ca_cert.resolve())))
    return targets


# -- the master's id -------------------------------------------------------------------------------

MASTER_ID_RE = re.compile(r"m-[0-9a-f]{8}")


def ensure_master_id(paths: Paths) -> str:
    """This master's id in the cluster: made once ("m-" + 8 hex), kept in DATA_DIR/master.id,
    so a restarted master is the same registry entry and lease holder as before."""
    _private_dir(paths)
    try:
        text = paths.master_id.read_text().strip()
    except FileNotFoundError:
        text = "m-" + secrets.token_hex(4)
        paths.master_id.write_text(text + "\n")
    if not MASTER_ID_RE.fullmatch(text):
        raise StartupError(f"{paths.master_id} holds {text[:40]!r}, not a master id (m- and 8 hex digits): "
                           "fix it or remove the file to get a new id")
    return text


# -- secrets shared through the store (issue 15: several masters on one PostgreSQL) -------------------

#: meta keys of the sealed secrets; ``sealed.complete`` is written once all the others are, so a
#: secret that goes missing later is refused instead of silently made again
SEALED_CA = "sealed.ca"
SEALED_PROXY_CA = "sealed.proxy_ca"
SEALED_E2E = "sealed.e2e_key"
SEALED_ADMIN = "sealed.admin_token"
SEALED_COMPLETE = "sealed.complete"


@dataclass
class SharedPki:
    admin_token: str
    #: the cluster key (from the key file): agents' MAC keys are sealed under it too
    cluster_key: bytes
    #: this master made the cluster's CA (the first master), the proxy CA (an old data dir's
    #: first start on a store), the key file
    made_ca: bool
    made_proxy_ca: bool
    made_key_file: bool


@dataclass
class _Secret:
    name: str
    #: the data dir's files this secret is written to
    files: list[Path]
    make: Callable[[], list[bytes]]


def _ca_pair(subject: str) -> Callable[[], list[bytes]]:
    def make() -> list[bytes]:
        return list(make_ca(subject))
    return make


def _new_e2e() -> list[bytes]:
    from hcsdk.protocol.e2e import new_keypair

    return [new_keypair()[0]]


def _new_admin_token() -> list[bytes]:
    return [("zya_" + secrets.token_urlsafe(32)).encode()]


def _secrets(paths: Paths) -> list[_Secret]:
    return [_Secret(SEALED_CA, [paths.ca_cert, paths.ca_key], _ca_pair("zy master CA")),
            _Secret(SEALED_PROXY_CA, [paths.proxy_ca_cert, paths.proxy_ca_key], _ca_pair("zy proxy CA")),
            _Secret(SEALED_E2E, [paths.e2e_key], _new_e2e),
            _Secret(SEALED_ADMIN, [paths.admin_token], _new_admin_token)]


def _pack(parts: list[bytes]) -> bytes:
    return json.dumps([base64.b64encode(p).decode() for p in parts]).encode()


def _unpack(name: str, raw: bytes, count: int) -> list[bytes]:
    try:
        parts = [base64.b64decode(p, validate=True) for p in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise KeyringError(f"the store's secret {name} opened but is malformed ({exc})") from None
    if len(parts) != count:
        raise KeyringError(f"the store's secret {name} opened but holds {len(parts)} parts, not {count}")
    return parts


def _local(secret: _Secret) -> list[bytes] | None:
    """What the data dir already holds for ``secret`` (all of its files, or None): the first
    master of a store seeds it from its own data dir, so a migrated data dir keeps its CA and
    the agents that trust it."""
    if not all(f.exists() for f in secret.files):
        return None
    return [f.read_bytes() for f in secret.files]


def _shared_secret(store: Store, key: bytes, key_file: Path, secret: _Secret,
                   complete: bool) -> tuple[list[bytes], bool]:
    """The store's value of ``secret`` and whether this master made it. A missing one is seeded
    (first writer wins, then re-read, so masters starting at once all end with the same one);
    a value that does not open is refused: it was changed, and making a new CA would strand
    every agent."""
    sealed = store.get_meta(secret.name)
    candidate: list[bytes] | None = None
    if sealed is None:
        if complete:
            raise KeyringError(f"the store's secret {secret.name} is missing although the cluster's secrets were "
                               "all written once: refusing to make a new one (restore the meta table from a backup)")
        candidate = _local(secret) or secret.make()
        sealed = store.init_meta(secret.name, seal(key, secret.name, _pack(candidate)))
    try:
        value = _unpack(secret.name, unseal(key, secret.name, sealed), len(secret.files))
    except Unsealable:
        raise KeyringError(f"the store's secret {secret.name} does not open under the key file {key_file} although "
                           "the key is right: the value was changed in the store; refusing to start (nothing was "
                           "regenerated: restore the meta table from a backup)") from None
    return value, value == candidate and _local(secret) is None


def _check_local(paths: Paths, secret: _Secret, value: list[bytes]) -> None:
    """A data dir that holds another CA (or key, or token) than the cluster's is someone else's:
    refuse rather than overwrite it."""
    for path, data in zip(secret.files, value, strict=True):
        if path.exists() and path.read_bytes() != data:
            raise KeyringError(f"{path} is not the cluster's ({secret.name} in the store differs): this data dir "
                               f"belongs to another master or cluster; start this master on a new --data-dir")


def _write_local(secret: _Secret, value: list[bytes]) -> None:
    for path, data in zip(secret.files, value, strict=True):
        if path.exists():
            continue  # the same bytes (checked)
        if path.suffix == ".pem":
            path.write_bytes(data)
        else:
            _write_private(path, data)


def ensure_shared_pki(store: Store, paths: Paths, key_file: Path, names: list[str]) -> SharedPki:
    """With a shared store: the CAs, the e2e key and the admin token from the store's meta,
    sealed under ``key_file`` (made there by the first master), written into this data dir
    where the rest of the master reads them; and this master's own server certificate.

    Everything is read and checked before anything is written, so a wrong key or a changed
    value stops the master with the store and the data dir as they were."""
    _private_dir(paths)
    key, made_key_file = open_keyring(store, key_file)
    complete = store.get_meta(SEALED_COMPLETE) is not None
    got: list[tuple[_Secret, list[bytes], bool]] = []
    for secret in _secrets(paths):
        value, made = _shared_secret(store, key, key_file, secret, complete)
        got.append((secret, value, made))
    if not complete:
        store.init_meta(SEALED_COMPLETE, seal(key, SEALED_COMPLETE, b"1"))
    for secret, value, _ in got:
        _check_local(paths, secret, value)
    for secret, value, _ in got:
        _write_local(secret, value)
    token = got[3][1][0].decode()
    if store.get_meta("admin_token_hash") != secret_hash(token):
        store.set_meta("admin_token_hash", secret_hash(token))
    ensure_server_cert(paths, names)
    return SharedPki(admin_token=token, cluster_key=key, made_ca=got[0][2], made_proxy_ca=got[1][2],
                     made_key_file=made_key_file)
