"""Fetch blobs (chunks) from a proxy or the master the way an agent does, for tests.

An agent's identity is its state dir's ``identity.json`` (uuid, credential). A handshake with it
opens a session (``sid``); ``GET /v1/blob?sha256=...&sid=...`` with the same credential fetches.
A handshake supersedes any agent process using the same identity: enroll identities for test
clients by starting agents once, then stop them and use what they left (see ``enroll_clients``).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from fleet import Fleet, wait_for


class ChunkClient:
    def __init__(self, url: str, state_dir: Path, http2: bool = True):
        ident = json.loads((state_dir / "identity.json").read_text())
        self.url = url.rstrip("/")
        self.uuid = str(ident["uuid"])
        self.auth = {"authorization": f"Bearer {ident['uuid']}:{ident['credential']}"}
        self.ca = str(state_dir / "ca.pem")
        self.http2 = http2
        self.sid = ""

    def _client(self) -> httpx.Client:
        return httpx.Client(verify=ssl.create_default_context(cafile=self.ca), http2=self.http2, headers=self.auth,
                            timeout=60)

    def handshake(self, hostname: str = "chunk-client", wait: float = 20.0) -> str:
        """Open a session; a 503 (the proxy has no upstream yet, as just after its start) is
        retried for up to ``wait`` seconds, as an agent's backoff would."""
        deadline = time.monotonic() + wait
        while True:
            with self._client() as http:
                resp = http.post(f"{self.url}/v1/handshake", json={"facts": {"hostname": hostname}, "labels": {}})
            if resp.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        resp.raise_for_status()
        self.sid = str(resp.json()["sid"])
        return self.sid

    def get(self, sha: str, sid: str | None = None) -> httpx.Response:
        """One request for a blob, on a connection of its own (as one agent would)."""
        with self._client() as http:
            return http.get(f"{self.url}/v1/blob", params={"sha256": sha, "sid": self.sid if sid is None else sid})

    def post(self, path: str, body: object) -> httpx.Response:
        """A JSON request in this client's session (the tracker's routes)."""
        with self._client() as http:
            return http.post(f"{self.url}{path}", params={"sid": self.sid}, json=body)

    def fetch(self, sha: str) -> bytes:
        resp = self.get(sha)
        assert resp.status_code == 200, f"GET blob {sha[:12]}: {resp.status_code} {resp.text[:300]}"
        return resp.content

    def get_concurrently(self, shas: Sequence[str]) -> list[httpx.Response]:
        """Ask for every sha in ``shas`` at once, each on its own connection."""
        with ThreadPoolExecutor(len(shas)) as pool:
            return list(pool.map(self.get, shas))


def enroll_clients(fleet: Fleet, names: Sequence[str], url: str | None = None) -> list[Path]:
    """Enroll one agent identity per name, at the master or through ``url`` (start, wait online,
    stop); returns their state dirs. An identity then handshakes with any proxy of the fleet."""
    for name in names:
        fleet.start_agent(name, extra=["--master", url] if url else None)
    fleet.wait_online(*names)
    for name in names:
        fleet.agents.pop(name).stop()
    wait_for(lambda: not set(names) & fleet.online(), 30, f"{list(names)} offline")
    return [fleet.root / "agents" / name for name in names]
