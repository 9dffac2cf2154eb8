"""REST routes for releases (``client.release``): create, follow, pause, resume, abort, roll back."""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from hcsdk.protocol.manifest import Manifest, ManifestError

from .hub import RequestRejected
from .releases import Releases
from .targets import resolve

#: a share of the targets, matched whole (fullmatch, \Z): "$" would also take "20%\n"
_SHARE = re.compile(r"\A\d+(\.\d+)?%\Z")


class ReleaseRequest(BaseModel):
    artifact: str = Field(min_length=1, description="artifact id, or name (the newest of that name)")
    targets: dict[str, Any]
    dest: str = Field(min_length=2, max_length=4096)
    batch: int | str = 10
    pre: str | None = None
    post: str | None = None
    health: str | None = None
    rollback: str | None = None
    max_failures: int | str = 0
    pause_between: float = Field(default=0, ge=0, le=86400)
    mode: int = Field(default=0o644, ge=0, le=0o7777)
    #: agents share chunks with their peers (their proxy is the tracker)
    p2p: bool = True
    #: bytes a second each agent downloads at most (0: no cap)
    rate: float = Field(default=0, ge=0)
    #: per step and target
    timeout: float = Field(default=600, gt=0, le=86400)


def release_routes(releases: Releases, admin: Any) -> APIRouter:
    router = APIRouter(dependencies=[Depends(admin)])

    @router.post("/api/v1/releases")
    async def create(req: ReleaseRequest) -> dict[str, Any]:
        if not req.dest.startswith("/") or "\0" in req.dest:
            raise RequestRejected(f"dest={req.dest!r} must be an absolute path on the targets")
        for name, value in (("batch", req.batch), ("max_failures", req.max_failures)):
            if isinstance(value, str) and not _SHARE.fullmatch(value):
                raise RequestRejected(f"{name}={value!r}: give a number or a percentage like '20%'")
        found = await releases.artifact(req.artifact)
        if found is None:
            raise RequestRejected(f"no artifact {req.artifact!r} (upload it with client.artifacts.upload)",
                                  kind="artifact", status=404)
        try:
            agents = resolve(req.targets, await releases.target_rows())
        except ValueError as exc:
            raise RequestRejected(str(exc), kind="target") from None
        artifact = {"id": found["id"], "name": found["name"], "manifest": found["manifest"]}
        try:  # one registered before names were checked (a reserved name, say) goes to no agent
            Manifest.from_dict(artifact["manifest"])
        except ManifestError as exc:
            raise RequestRejected(f"artifact {found['id']} cannot be released: {exc}", kind="artifact",
                                  status=409) from None
        options = req.model_dump(exclude={"artifact", "targets", "dest"})
        release_id = await releases.create(artifact, agents, req.dest, options)
        return await releases.get(release_id)

    @router.get("/api/v1/releases")
    async def listing() -> list[dict[str, Any]]:
        return await releases.listing()

    @router.get("/api/v1/releases/{release_id}")
    async def get(release_id: str) -> dict[str, Any]:
        return await releases.get(release_id)

    @router.post("/api/v1/releases/{release_id}/{action}")
    async def act(release_id: str, action: Literal["pause", "resume", "abort", "rollback"]) -> dict[str, Any]:
        return await releases.act(release_id, action)

    return router
