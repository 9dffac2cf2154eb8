"""A channel client's state directory (agents and proxies): identity (uuid, credential, end-to-end
key), the pinned CA, and (for agents) the spool."""

from __future__ import annotations

import json
import os
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hcsdk.common.files import atomic_write


@dataclass(kw_only=True)
class Identity:
    uuid: str
    credential: str = ""
    urls: list[str] = field(default_factory=list)
    ca_fingerprint: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    #: hex of the 32-byte key this agent and the master share for end-to-end MACs
    e2e_key: str = ""

    @property
    def enrolled(self) -> bool:
        return bool(self.credential)


class StateDir:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    @property
    def identity_path(self) -> Path:
        return self.root / "identity.json"

    @property
    def ca_path(self) -> Path:
        return self.root / "ca.pem"

    @property
    def spool_path(self) -> Path:
        return self.root / "spool.db"

    def load(self) -> Identity:
        """The saved identity; on the very first start a fresh UUID, saved at once so a retried
        enrollment keeps it."""
        if self.identity_path.exists():
            data = json.loads(self.identity_path.read_text())
            return Identity(**data)
        ident = Identity(uuid=str(uuidlib.uuid4()))
        self.save(ident)
        return ident

    def save(self, ident: Identity) -> None:
        atomic_write(self.identity_path, json.dumps(asdict(ident), indent=1), mode=0o600)
