"""Content-addressed files the master hands to agents (agent builds for online updates).

``POST /api/v1/blobs`` (admin token) streams a file in; it is stored under its SHA-256, which is
the answer. Agents fetch it with ``GET /v1/blob?sha256=...`` on the channel's connection (direct
or through their proxies) and check it against the hash in the signed command that named it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import anyio

from hcsdk.net.asgi import Receive, Scope, Send, error, query, respond
from hcsdk.net.channel_server import bearer_token
from hcsdk.net.limits import authenticated, send_file
from hcsdk.protocol.names import is_sha256

from .bootstrap import secret_hash
from .hub import Hub
from .store import AgentRecord

MAX_BLOB = 2 * 1024**3


class BlobStore:
    def __init__(self, root: Path, hub: Hub) -> None:
        self.root = root
        self.hub = hub

    def path(self, sha: str) -> Path | None:
        if not is_sha256(sha):
            return None
        path = self.root / sha
        return path if path.is_file() else None

    async def upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the body to disk while hashing it: a build never sits whole in memory."""
        if not await self.admin(scope, send):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".upload-{secrets.token_hex(8)}"
        digest, size = hashlib.sha256(), 0
        try:
            async with await anyio.open_file(tmp, "wb") as fh:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > MAX_BLOB:
                        await error(send, 413, f"the file exceeds {MAX_BLOB} bytes")
                        return
                    digest.update(chunk)
                    await fh.write(chunk)
                    if not msg.get("more_body"):
                        break
                await fh.flush()
                await anyio.to_thread.run_sync(os.fsync, fh.wrapped.fileno())
            if size == 0:
                await error(send, 400, "the upload is empty")
                return
            sha = digest.hexdigest()
            os.replace(tmp, self.root / sha)
        finally:
            tmp.unlink(missing_ok=True)
        await respond(send, 200, {"sha256": sha, "size": size})

    async def download(self, scope: Scope, receive: Receive, send: Send, row: AgentRecord | None) -> None:
        if row is None:
            return  # the caller answered 401/403 already
        sha = query(scope).get("sha256", "")
        path = self.path(sha)
        if path is None:
            await error(send, 404, f"no file with SHA-256 {sha!r} on the master", kind="blob")
            return
        # how often blobs leave the master (and how many bytes): what proxy caches save shows here
        # (GET /api/v1/status)
        self.hub.stats["blobs_served"] = self.hub.stats.get("blobs_served", 0) + 1
        # streamed from disk a chunk at a time: eight downloads of a 200 MiB build held 1.4 GiB
        # when each was read whole
        sent = await send_file(send, path, send_timeout=self.hub.settings.send_timeout)
        self.hub.stats["blob_bytes_served"] = self.hub.stats.get("blob_bytes_served", 0) + sent

    async def admin(self, scope: Scope, send: Send) -> bool:
        """The admin token, from the headers: checked before any body is read (401 otherwise,
        with the API's own messages)."""
        token = bearer_token(scope)
        if token is None:
            await error(send, 401, "API token missing (send 'Authorization: Bearer <token>')", kind="auth")
            return False
        expected = await self.hub.db(self.hub.db.store.get_meta, "admin_token_hash") or ""
        if not hmac.compare_digest(expected, secret_hash(token)):
            await error(send, 401, "API token is not valid", kind="auth")
            return False
        authenticated(scope)
        return True
