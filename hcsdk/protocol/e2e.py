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
import hmac
import json
import json.encoder
from collections.abc import Callable
from typing import Any

from .depth import MAX_DEPTH, nests_deeper
from .errors import MessageError

__all__ = ["canonical", "derive_key", "mac_of", "new_keypair", "public_key", "sign", "verify"]

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
    # a path of n levels needs n opening brackets: counted inline, since nearly every message
    # has far fewer than the bound and this runs on every sign
    if text.count("{") + text.count("[") > MAX_DEPTH and nests_deeper(body, MAX_DEPTH):
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels of objects and lists")
    return text.encode()


_OPTIONS = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _encoder() -> Callable[[dict[str, Any]], str]:
    """The canonical form's encoder, made once: ``json.dumps`` builds a JSONEncoder and a C
    encoder on every call, which was a third of a MAC's cost. Without circular-reference
    markers (a cycle recurses to RecursionError, refused like depth); where the C encoder is
    missing, JSONEncoder.encode, which gives the same text."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has it
        return _OPTIONS.encode
    c_encode = make(None, _OPTIONS.default, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)

    def encode(body: dict[str, Any]) -> str:
        return "".join(c_encode(body, 0))

    return encode


_encode = _encoder()


def _canonical_text(msg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    body = {k: v for k, v in msg.items() if k != "m"} if "m" in msg else msg
    try:
        return body, _encode(body)
    except RecursionError:
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels of objects and lists") from None
    except (TypeError, ValueError) as exc:  # not JSON: a non-str key beside str ones, a cycle, an object
        raise MessageError(f"message has no canonical JSON form: {exc}") from None


def mac_of(key: bytes, canonical_bytes: bytes) -> str:
    """The MAC (hex) of a canonical form: the one-shot C HMAC, a third cheaper than hmac.new."""
    return hmac.digest(key, canonical_bytes, "sha256").hex()


def sign(key: bytes, msg: dict[str, Any]) -> dict[str, Any]:
    msg["m"] = mac_of(key, canonical(msg))
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
    return hmac.compare_digest(mac.encode(), mac_of(key, body).encode())
