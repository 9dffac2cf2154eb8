"""REST routes for scheduled collection: schedules (kept here and on the agents) and the series
of samples they produce."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from hcsdk.protocol import vocab

from .hub import Hub, RequestRejected, check_cmd
from .schedule_spec import NAME_PATTERN, schedule_args
from .targets import selects


class ScheduleRequest(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    cmd: str
    args: dict[str, Any] = Field(default_factory=dict)
    every: float = Field(ge=1, le=7 * 86400)
    #: per run; 0 means the period (at most 300 s)
    timeout: float = Field(default=0, ge=0, le=86400)
    targets: dict[str, Any]


def schedule_routes(hub: Hub, admin: Any) -> APIRouter:
    router = APIRouter(dependencies=[Depends(admin)])
    store = hub.db.store

    @router.post("/api/v1/schedules")
    async def create_schedule(req: ScheduleRequest) -> dict[str, Any]:
        check_cmd(req.cmd)
        if req.cmd.startswith("zy."):
            raise RequestRejected(f"cmd {req.cmd!r} cannot be scheduled", kind="cmd")
        args = schedule_args(req.name, req.cmd, req.args, req.every, req.timeout)
        before = await hub.db(store.schedule, req.name)
        try:
            run = await hub.create_run(vocab.SCHEDULE_SET, args, req.targets, 60.0)
        except RequestRejected as exc:
            # a glob or label selector may match no agent yet: those that join later get the
            # schedule at their handshake
            if exc.kind != "target" or "expr" not in req.targets:
                raise
            run = None
        await hub.db(store.put_schedule, req.name, req.cmd, req.args, req.every, req.timeout, req.targets)
        hub.schedule_specs = None
        if before is not None and before["targets"] != req.targets:
            await _cancel_where_dropped(hub, req.name, before["targets"], run)
        return {"schedule": await hub.db(store.schedule, req.name), "run": run}

    @router.get("/api/v1/schedules")
    async def list_schedules() -> list[dict[str, Any]]:
        return await hub.db(store.schedules)

    @router.delete("/api/v1/schedules/{name}")
    async def cancel_schedule(name: str) -> dict[str, Any]:
        schedule = await hub.db(store.schedule, name)
        if schedule is None:
            raise RequestRejected(f"no schedule {name!r}", kind="schedule", status=404)
        try:
            run = await hub.create_run(vocab.SCHEDULE_CANCEL, {"name": name}, schedule["targets"], 60.0)
        except RequestRejected as exc:
            if exc.kind != "target":
                raise
            run = None  # its agents are gone: nothing to tell
        await hub.db(store.delete_schedule, name)
        hub.schedule_specs = None
        return {"name": name, "run": run}

    @router.get("/api/v1/series/{name}")
    async def series(name: str, since: float | None = None, until: float | None = None,
                     limit: int = Query(default=200_000, ge=1, le=2_000_000)) -> list[dict[str, Any]]:
        return await hub.db(store.series, name, since, until, limit)

    return router


async def _cancel_where_dropped(hub: Hub, name: str, old_targets: dict[str, Any], run: dict[str, Any] | None) -> None:
    """A schedule set again with other targets: the agents it no longer names stop it."""
    agents = await hub.db(hub.db.store.target_rows)
    kept = {t["uuid"] for t in (run or {}).get("targets", [])}
    dropped = [a["uuid"] for a in agents if selects(old_targets, a) and a["uuid"] not in kept]
    if dropped:
        await hub.create_run(vocab.SCHEDULE_CANCEL, {"name": name}, {"uuids": dropped}, 60.0)
