"""The origin: artifacts stored as content-addressed chunks (blobs) plus a manifest.

The SDK asks which chunks the master lacks (``POST /api/v1/blobs/missing``), uploads those as
blobs (``POST /api/v1/blobs``, streamed), then registers the manifest (``POST /api/v1/artifacts``),
which the master accepts only when every chunk is here with the right size. An interrupted
upload resumes by sending only what is still missing; a chunk shared by two versions is stored
once.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from hcsdk.protocol.manifest import Manifest, ManifestError

from .blobs import BlobStore
from .bootstrap import Paths
from .hub import Hub, RequestRejected
from .store import ArtifactRecord


class MissingRequest(BaseModel):
    sha256s: list[str] = Field(max_length=100_000)


class ArtifactRequest(BaseModel):
    manifest: dict[str, Any]


def artifact_routes(hub: Hub, paths: Paths, admin: Any) -> APIRouter:
    router = APIRouter(dependencies=[Depends(admin)])
    # the files here, or (several masters) the store's blobs: a chunk uploaded to another master counts
    blobs = BlobStore(paths.root / "blobs", hub)
    store = hub.db.store

    @router.post("/api/v1/blobs/missing")
    async def missing(req: MissingRequest) -> dict[str, Any]:
        have = await blobs.sizes(req.sha256s)
        return {"missing": [s for s in dict.fromkeys(req.sha256s) if s not in have]}

    @router.post("/api/v1/artifacts")
    async def register(req: ArtifactRequest) -> dict[str, Any]:
        # the manifest's own checks (hcsdk.protocol.names) refuse a name that is not a plain file name
        # or is one of the agent's own (.zy-*): it would name a file beside the agent's metadata
        try:
            manifest = Manifest.from_dict(req.manifest)
        except ManifestError as exc:
            raise RequestRejected(f"bad manifest: {exc}") from None
        have = await blobs.sizes(list(manifest.chunks))
        absent = [i for i, sha in enumerate(manifest.chunks) if have.get(sha) != manifest.chunk_length(i)]
        if absent:
            raise RequestRejected(f"{len(absent)} of {len(manifest.chunks)} chunks are not on the master (first: "
                                  f"chunk {absent[0]}); upload them first", kind="chunks", status=409)
        await hub.db(store.add_artifact, manifest.digest(), manifest.name, manifest.size, manifest.sha256,
                     manifest.to_dict(), time.time())
        return await get(manifest.digest())

    @router.get("/api/v1/artifacts")
    async def listing() -> list[dict[str, Any]]:
        return [_info(a) for a in await hub.db(store.artifacts)]

    @router.get("/api/v1/artifacts/{ref}")
    async def get(ref: str) -> dict[str, Any]:
        """An artifact by id (its manifest's digest), or the newest of that name."""
        artifact = await hub.db(store.artifact, ref)
        if artifact is None:
            raise RequestRejected(f"no artifact {ref!r} (give its id or its name)", kind="artifact", status=404)
        return {**_info(artifact), "manifest": artifact["manifest"]}

    return router


def _info(artifact: ArtifactRecord) -> dict[str, Any]:
    return {"id": artifact["id"], "name": artifact["name"], "size": artifact["size"], "sha256": artifact["sha256"],
            "chunks": len(artifact["manifest"]["chunks"]), "created_at": artifact["created_at"]}
