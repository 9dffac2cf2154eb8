"""First start of a master: data directory, CA, server certificate, admin token, client.toml."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from hcsdk._config import ClientConfig, user_config_path, write_client_config
from hcsdk._tls import issue_server_cert, make_ca

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
    def cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def key(self) -> Path:
        return self.root / "server.key"

    @property
    def client_config(self) -> Path:
        return self.root / "client.toml"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def server_names(host: str, extra: list[str]) -> list[str]:
    names = [n for n in [host, *extra] if n and n not in ("0.0.0.0", "::")]
    return list(dict.fromkeys([*names, "localhost", "127.0.0.1", "::1", socket.gethostname()]))


def ensure_pki(paths: Paths, names: list[str]) -> None:
    """Create the CA once; (re)issue the server certificate when the names it must cover change."""
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)
    if not paths.ca_cert.exists():
        cert, key = make_ca()
        _write_private(paths.ca_key, key)
        paths.ca_cert.write_bytes(cert)
    names_file = paths.root / "server.names"
    wanted = "\n".join(sorted(names))
    if not paths.cert.exists() or not names_file.exists() or names_file.read_text() != wanted:
        cert, key = issue_server_cert(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), names)
        _write_private(paths.key, key)
        paths.cert.write_bytes(cert)
        names_file.write_text(wanted)


def ensure_admin_token(store: Store, paths: Paths) -> str | None:
    """Create the admin token on first start. Returns it when new (it is shown once and written
    to client.toml); the store keeps only its hash."""
    if store.get_meta("admin_token_hash"):
        return None
    token = "zya_" + secrets.token_urlsafe(32)
    store.set_meta("admin_token_hash", secret_hash(token))
    return token


def write_client_configs(paths: Paths, url: str, token: str | None, to_user: bool) -> list[Path]:
    """client.toml in the data dir (and the user's config dir). The token is only known on the
    first start, later starts keep the token already written and refresh the URL."""
    written = []
    targets = [paths.client_config] + ([user_config_path()] if to_user else [])
    for path in targets:
        tok = token
        if tok is None and path.exists():
            import tomllib

            tok = tomllib.loads(path.read_text()).get("token")
        if tok is None and paths.client_config.exists():
            import tomllib

            tok = tomllib.loads(paths.client_config.read_text()).get("token")
        if tok is None:
            continue
        write_client_config(path, ClientConfig(url=url, token=tok, ca=str(paths.ca_cert.resolve())))
        written.append(path)
    return written
