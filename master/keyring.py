"""The cluster key: what the secrets kept in a shared store (issue 15) are sealed under.

Several masters on one PostgreSQL share their CA keys, the end-to-end key and the admin token
through the store's ``meta`` table. Anyone who can read that table (a DBA, a replica, a backup)
must not get the control plane with it, so every such value is sealed with AES-256-GCM under a
32-byte key that lives only in a file on each master's host (``--key-file``): the first master
makes it, the operator copies it to the others.

A sealed value is ``v1:`` + base64(nonce || ciphertext || tag). The meta key's name is the
associated data, so a value moved under another name (the proxy CA's key under the master CA's
name, say) does not open. ``keyring_check`` in meta is a sealed constant: a master started with
another key file finds out at once, before it reads or writes anything else.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hcsdk.net.serve import StartupError

from .store import Store

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = "v1:"
#: the meta key of the check value, and what it seals
CHECK_NAME = "keyring_check"
CHECK_PLAINTEXT = b"zy cluster key check v1"


class KeyringError(StartupError):
    """The key file or a sealed value is not usable; the message names which and what to do."""


class Unsealable(ValueError):
    """A sealed value does not open under this key (another key, another name, or changed)."""


# -- the key file ------------------------------------------------------------------------------

def read_key(path: Path) -> bytes:
    """The key in ``path``; refused when other users may read it or it is not a key."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyringError(f"the key file {path} does not exist") from None
    if st.st_mode & 0o077:
        raise KeyringError(f"the key file {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                           f"it guards the cluster's CA key and admin token; chmod 600 {path}")
    text = path.read_text().strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyringError(f"the key file {path} does not hold a cluster key (base64 of {KEY_BYTES} bytes)")
    return key


def create_key(path: Path) -> bool:
    """Make a new key file at ``path`` (0600) unless one exists; returns whether this call made it.

    Written to a temporary file and linked into place, so a master starting at the same moment
    with the same path reads either no file or a whole one, and exactly one key is made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink()


# -- sealing -----------------------------------------------------------------------------------

def _aad(name: str) -> bytes:
    return f"zy meta {name}".encode()


def seal(key: bytes, name: str, plaintext: bytes) -> str:
    """``plaintext`` sealed under ``key`` for the meta key ``name``."""
    nonce = secrets.token_bytes(NONCE_BYTES)  # random 96-bit nonces: a handful of values per key
    body = AESGCM(key).encrypt(nonce, plaintext, _aad(name))
    return VERSION + base64.b64encode(nonce + body).decode()


def unseal(key: bytes, name: str, sealed: str) -> bytes:
    """The plaintext of ``sealed``; ``Unsealable`` when it is not a value sealed under ``key``
    for ``name`` (another key, another name, a changed byte, an unknown version)."""
    if not sealed.startswith(VERSION):
        raise Unsealable(f"{name}: not a sealed value of a known version (expected {VERSION!r})")
    try:
        raw = base64.b64decode(sealed[len(VERSION):], validate=True)
    except (binascii.Error, ValueError):
        raise Unsealable(f"{name}: not base64") from None
    if len(raw) < NONCE_BYTES + 16:
        raise Unsealable(f"{name}: too short to be sealed")
    try:
        return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(name))
    except InvalidTag:
        raise Unsealable(f"{name}: does not open under this key") from None


# -- the key and the store -----------------------------------------------------------------------

def open_keyring(store: Store, path: Path) -> tuple[bytes, bool]:
    """The cluster key for ``store``, and whether this master made the key file.

    A store with no check value yet is new: this master is the first, makes the key file if
    there is none, and writes the check value (first writer wins). Otherwise the key file
    must open the check value, or the master stops here, having written nothing."""
    existing = store.get_meta(CHECK_NAME)
    made = False
    if existing is None and not path.exists():
        made = create_key(path)
    elif existing is not None and not path.exists():
        raise KeyringError(f"the key file {path} does not exist, and this store's secrets are sealed under "
                           "a key (copy the first master's key file there, mode 600, or name it with --key-file)")
    key = read_key(path)
    if existing is None:
        existing = store.init_meta(CHECK_NAME, seal(key, CHECK_NAME, CHECK_PLAINTEXT))
    try:
        ok = unseal(key, CHECK_NAME, existing) == CHECK_PLAINTEXT
    except Unsealable:
        ok = False
    if not ok:
        if made:  # another master set the store up at the same moment, under its own new key
            path.unlink()
        raise KeyringError(f"the key file {path} does not open this store's secrets (copy the first "
                           "master's key file)")
    return key, made


# -- each agent's MAC key, as the store keeps it -------------------------------------------------

class AgentKeys:
    """Each agent's end-to-end MAC key as the store keeps it (``agents.e2e_key``).

    With a shared store the key is sealed under the cluster key, for the meta-like name
    ``agents.e2e_key <uuid>`` (so a row's key cannot be moved to another uuid): a database reader
    who also carries an agent's traffic (root on a proxy host) cannot forge its commands. Without
    one (SQLite, ``cluster_key`` None) it stays as it was. A plain 32-byte key read back (a
    migrated data dir, an agent enrolled before sealing) is used as it is."""

    def __init__(self, cluster_key: bytes | None) -> None:
        self._key = cluster_key

    @staticmethod
    def _name(uuid: str) -> str:
        return f"agents.e2e_key {uuid}"

    def to_store(self, uuid: str, mac_key: bytes) -> bytes:
        if self._key is None:
            return mac_key
        return seal(self._key, self._name(uuid), mac_key).encode()

    def from_store(self, uuid: str, stored: bytes) -> bytes:
        """The MAC key; ``Unsealable`` when the stored value is sealed but does not open."""
        if len(stored) == KEY_BYTES or not stored.startswith(VERSION.encode()):
            return stored  # plain: 32 bytes (a sealed value is never 32 bytes long)
        if self._key is None:
            raise Unsealable(f"{self._name(uuid)}: sealed, and this master has no cluster key (--store)")
        return unseal(self._key, self._name(uuid), stored.decode("ascii", "replace"))
