"""X25519 (RFC 7748) and HKDF-SHA256 (RFC 5869) in pure Python, for agents without `cryptography`.

The zipapp agent (``zy-agent.pyz``) runs on any stdlib Python 3.11+, where the compiled
`cryptography` package cannot be loaded from the archive. Enrollment needs one X25519 key pair
and one Diffie-Hellman exchange (see ``hcsdk.protocol.e2e``); that is all this module does, and only
where `cryptography` cannot be imported.

Python integers are not constant-time, so this leaks timing in principle. It runs once per agent,
at enrollment, on a key that is generated right there, so no attacker gets to repeat a
measurement against the same secret; the master always uses `cryptography`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["derive_shared", "hkdf_sha256", "new_private", "public_key", "x25519"]

_P = 2**255 - 19
_A24 = 121665
_BASE = (9).to_bytes(32, "little")


def _scalar(k: bytes) -> int:
    """decodeScalar25519: clamp the 32-byte scalar."""
    b = bytearray(k)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return int.from_bytes(b, "little")


def _u(u: bytes) -> int:
    """decodeUCoordinate: the top bit is ignored and non-canonical values are reduced."""
    b = bytearray(u)
    b[31] &= 127
    return int.from_bytes(b, "little") % _P


def x25519(k: bytes, u: bytes) -> bytes:
    """The X25519 function: scalar ``k`` times the point with u-coordinate ``u`` (32 bytes each)."""
    if len(k) != 32 or len(u) != 32:
        raise ValueError("X25519 keys are 32 bytes")
    scalar = _scalar(k)
    x1 = _u(u)
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    for t in range(254, -1, -1):  # the Montgomery ladder, RFC 7748 section 5
        bit = (scalar >> t) & 1
        swap ^= bit
        if swap:
            x2, x3 = x3, x2
            z2, z3 = z3, z2
        swap = bit
        a = x2 + z2
        aa = a * a % _P
        b = x2 - z2
        bb = b * b % _P
        e = aa - bb
        c = x3 + z3
        d = x3 - z3
        da = d * a % _P
        cb = c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


def new_private() -> bytes:
    return secrets.token_bytes(32)


def public_key(private: bytes) -> bytes:
    return x25519(private, _BASE)


def derive_shared(private: bytes, peer_public: bytes) -> bytes:
    """The Diffie-Hellman shared secret; an all-zero result (a small-order peer key) is refused,
    as `cryptography` does."""
    shared = x25519(private, peer_public)
    if not any(shared):
        raise ValueError("X25519 exchange gave the all-zero value (bad peer public key)")
    return shared


def hkdf_sha256(ikm: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869); ``salt=None`` means 32 zero bytes, as in `cryptography`."""
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 output is at most 8160 bytes")
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]
