"""First start of a master: data directory, CA, server certificate, admin token, client.toml."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from hcsdk.common.config import ClientConfig, user_config_path, write_client_config
from hcsdk.net.tls import issue_server_cert, make_ca

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
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)
    if not paths.ca_cert.exists():
        cert, key = make_ca()
        _write_private(paths.ca_key, key)
        paths.ca_cert.write_bytes(cert)
    made_proxy_ca = not paths.proxy_ca_cert.exists()
    if made_proxy_ca:  # also the migration of a data dir from before the proxy CA
        cert, key = make_ca("zy proxy CA")
        _write_private(paths.proxy_ca_key, key)
        paths.proxy_ca_cert.write_bytes(cert)
    names_file = paths.server_names
    wanted = "\n".join(sorted(names))
    if not paths.cert.exists() or not names_file.exists() or names_file.read_text() != wanted:
        cert, key = issue_server_cert(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), names)
        _write_private(paths.key, key)
        paths.cert.write_bytes(cert)
        names_file.write_text(wanted)
    return made_proxy_ca


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


def write_client_configs(paths: Paths, url: str, token: str, to_user: bool) -> list[Path]:
    """client.toml in the data dir and, unless told not to, in the user's config dir."""
    targets = [paths.client_config] + ([user_config_path()] if to_user else [])
    for path in targets:
        write_client_config(path, ClientConfig(url=url, token=token, ca=str(paths.ca_cert.resolve())))
    return targets
