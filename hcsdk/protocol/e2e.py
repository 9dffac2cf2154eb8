"""End-to-end message authentication between the master and each agent.

Proxies relay messages but may be compromised, so every command (task, cancel, ack) and every
result (start, out, done) carries ``m``: an HMAC-SHA256 over the envelope, keyed with a secret
only the master and that agent hold. The key comes from X25519 at enrollment: the agent
combines its own private key with the master's public key (carried in the join token) and the
master combines its private key with the agent's public key, so the key itself never crosses
the wire and a relay cannot compute it.

The MAC covers a canonical JSON form (sorted keys, ASCII, no spaces) computed with the
standard library on both sides, so orjson and json peers agree byte for byte. A message with no
canonical form (nested deeper than ``wire.MAX_DEPTH``, or not JSON) cannot be signed
(MessageError) and never verifies: whatever a peer sends, :func:`verify` says False, never raises.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from .depth import MAX_DEPTH, nests_deeper
from .errors import MessageError

__all__ = ["canonical", "derive_key", "new_keypair", "public_key", "sign", "verify"]

_INFO = b"zy e2e v1 "


def _crypto() -> bool:
    """Whether `cryptography` can be imported; without it (the zipapp agent on a bare Python)
    ``hcsdk.protocol.x25519`` computes the same keys in pure Python."""
    try:
        import cryptography.hazmat.primitives.asymmetric.x25519  # noqa: F401
    except ImportError:
        return False
    return True


def new_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw X25519 keys."""
    if not _crypto():
        from hcsdk.protocol import x25519 as _x25519

        private = _x25519.new_private()
        return private, _x25519.public_key(private)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    private = key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return private, key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)


def public_key(private: bytes) -> bytes:
    if not _crypto():
        from hcsdk.protocol import x25519 as _x25519

        return _x25519.public_key(private)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    raw = serialization.Encoding.Raw
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(raw, serialization.PublicFormat.Raw)


def derive_key(private: bytes, peer_public: bytes, agent_uuid: str) -> bytes:
    """The shared 32-byte MAC key of one agent (the same on both ends)."""
    if not _crypto():
        from hcsdk.protocol import x25519 as _x25519

        shared = _x25519.derive_shared(private, peer_public)
        return _x25519.hkdf_sha256(shared, 32, _INFO + agent_uuid.encode())
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + agent_uuid.encode()).derive(shared)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical(msg: dict[str, Any]) -> bytes:
    """The bytes the MAC covers; raises MessageError (a ProtocolError) for a message without
    one. The depth bound is the decoder's, so nothing signed here is refused by the peer's."""
    body, text = _canonical_text(msg)
    if nests_deeper(body, MAX_DEPTH, text):
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels of objects and lists")
    return text.encode()


def _canonical_text(msg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    body = {k: v for k, v in msg.items() if k != "m"}
    try:
        return body, json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except RecursionError:
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels of objects and lists") from None
    except (TypeError, ValueError) as exc:  # not JSON: a non-str key beside str ones, a cycle, an object
        raise MessageError(f"message has no canonical JSON form: {exc}") from None


def sign(key: bytes, msg: dict[str, Any]) -> dict[str, Any]:
    msg["m"] = hmac.new(key, canonical(msg), hashlib.sha256).hexdigest()
    return msg


def verify(key: bytes, msg: dict[str, Any]) -> bool:
    """Whether ``msg`` carries the right MAC under ``key``; False for anything else, never an
    exception (an adapter calls it on what a relay sent)."""
    mac = msg.get("m")
    if not isinstance(mac, str):
        return False
    # no depth scan here (it cost ~5% of the master's uplink): what arrived passed the decoder's
    # bound, and a MAC over anything deeper cannot match, since canonical() never signs it
    try:
        body = _canonical_text(msg)[1].encode()
    except MessageError:
        return False
    # compared as bytes: compare_digest raises TypeError on a non-ASCII str, which a relay could send
    return hmac.compare_digest(mac.encode(), hmac.new(key, body, hashlib.sha256).hexdigest().encode())
