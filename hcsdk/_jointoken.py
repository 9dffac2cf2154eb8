"""Join tokens: what an agent needs for its first, unforgeable contact with a master.

Like kubeadm's token plus discovery hash in one string: the master's URL(s), the SHA-256
fingerprint of the master's CA, the master's public key for end-to-end message keys, and the
token's id and secret.

    zyj1.<base64url(JSON {"u": [urls], "ca": "sha256:...", "k": e2e public key, "id": ..., "s": ...})>
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from ._errors import JoinTokenError

__all__ = ["JoinToken"]

_PREFIX = "zyj1."


@dataclass(frozen=True, kw_only=True)
class JoinToken:
    urls: tuple[str, ...]
    ca_fingerprint: str
    e2e_public: str
    token_id: str
    secret: str

    def encode(self) -> str:
        body = {"u": list(self.urls), "ca": self.ca_fingerprint, "k": self.e2e_public, "id": self.token_id,
                "s": self.secret}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return _PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @property
    def credential(self) -> str:
        """What the agent presents to the enroll endpoint."""
        return f"{self.token_id}.{self.secret}"

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        text = text.strip()
        if not text.startswith(_PREFIX):
            raise JoinTokenError("not a join token (it should start with 'zyj1.'; create one with `zy token create`)")
        b64 = text[len(_PREFIX):]
        try:
            body = json.loads(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)))
            urls = tuple(str(u) for u in body["u"])
            token = cls(urls=urls, ca_fingerprint=str(body["ca"]), e2e_public=str(body["k"]), token_id=str(body["id"]),
                        secret=str(body["s"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise JoinTokenError("join token is damaged (was it copied whole?)") from None
        if not urls or not token.ca_fingerprint.startswith("sha256:"):
            raise JoinTokenError("join token names no master URL or no CA fingerprint")
        return token
