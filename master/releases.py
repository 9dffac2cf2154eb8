"""Sharded rollouts: a release moves one artifact to a set of targets, shard after shard.

For each shard: fetch (agents pull the chunks through their proxies), ``pre``, place (atomic,
previous kept), ``post``, ``health``; each step is a run over the shard's targets that have not
failed. Once more targets have failed than ``max_failures`` allows, the release pauses;
``resume``, ``abort`` and ``rollback`` (previous file back, then the rollback command) are the
operator's. Everything is in the store, including the run of the step in flight, so a master
that restarts picks a release up where it was.

With several masters (issue 15) releases are singleton work: only the master holding the lease
``singleton`` drives them, and the master that takes the lease over picks every active release
up from its stored step (the same path as after a restart), polling for releases created on
other masters meanwhile.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from typing import Any

import anyio

from hcsdk.protocol import vocab
from hcsdk.protocol.releases import ACTIVE, STEPS, Phase, ReleaseAction, ReleaseState, TargetStatus
from hcsdk.protocol.tasks import TaskStatus

from .dispatch import new_run_id
from .hub import Hub, RequestRejected
from .store import ArtifactRecord, ReleaseRecord, ReleaseSummary, ReleaseTargetRecord

log = logging.getLogger("zy.master.releases")

#: the states each operator action may come in, and the state it moves the release to
_ALLOWED: dict[str, tuple[ReleaseState, ...]] = {
    ReleaseAction.PAUSE: (ReleaseState.RUNNING,),
    ReleaseAction.RESUME: (ReleaseState.PAUSED,),
    ReleaseAction.ABORT: (ReleaseState.RUNNING, ReleaseState.PAUSED),
    ReleaseAction.ROLLBACK: (ReleaseState.RUNNING, ReleaseState.PAUSED, ReleaseState.DONE, ReleaseState.ABORTED,
                             ReleaseState.FAILED),
}
#: states an operator's action leaves a release in whose step run it cancels
_STOPS_STEP = (ReleaseState.ABORTED, ReleaseState.ROLLING_BACK, ReleaseState.ROLLED_BACK)
_MOVES_TO: dict[str, ReleaseState] = {ReleaseAction.PAUSE: ReleaseState.PAUSED,
                                      ReleaseAction.RESUME: ReleaseState.RUNNING,
                                      ReleaseAction.ABORT: ReleaseState.ABORTED,
                                      ReleaseAction.ROLLBACK: ReleaseState.ROLLING_BACK}


def shard_targets(uuids: list[str], batch: int | str) -> list[list[str]]:
    """``batch`` agents per shard, or a percentage of them (``"20%"``), at least one."""
    if isinstance(batch, str):
        if not batch.endswith("%"):
            raise RequestRejected(f"batch={batch!r}: give a number of targets or a percentage like '20%'")
        size = max(1, math.floor(len(uuids) * float(batch[:-1]) / 100))
    else:
        size = int(batch)
    if size < 1:
        raise RequestRejected("batch must be at least 1")
    return [uuids[i:i + size] for i in range(0, len(uuids), size)]


def failure_limit(max_failures: int | str, total: int) -> int:
    if isinstance(max_failures, str):
        if not max_failures.endswith("%"):
            raise RequestRejected(f"max_failures={max_failures!r}: give a count or a percentage like '5%'")
        return math.floor(total * float(max_failures[:-1]) / 100)
    return int(max_failures)


class Releases:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.db = hub.db
        self.store = hub.db.store
        self._driving: set[str] = set()
        self._woken: dict[str, anyio.Event] = {}
        if hub.cluster.shared:
            hub.cluster.singleton_work.append(self.start)

    async def start(self) -> None:
        """After a master restart, or on taking the singleton lease: carry on with every release
        that was under way (on a master that does not run singleton work, nothing)."""
        if self.hub.singleton_group is None:
            return
        for release_id in await self.db(self.store.release_ids, ACTIVE):
            self._drive(release_id)

    # -- what the API asks for ----------------------------------------------------------------
    async def create(self, artifact: dict[str, Any], agents: list[dict[str, Any]], dest: str,
                     options: dict[str, Any]) -> str:
        release_id = "rel" + secrets.token_hex(5)
        shards = shard_targets([a["uuid"] for a in agents], options["batch"])
        options["limit"] = failure_limit(options["max_failures"], len(agents))
        options["peer_key"] = await self._peer_key(artifact["id"])
        now = time.time()
        shard_of = {uuid: i for i, shard in enumerate(shards) for uuid in shard}
        release = {"id": release_id, "artifact_id": artifact["id"], "name": artifact["name"],
                   "manifest": artifact["manifest"], "dest": dest, "options": options, "shards": shards,
                   "state": ReleaseState.RUNNING, "created_at": now, "updated_at": now}
        targets = [(a["uuid"], a["hostname"], shard_of[a["uuid"]]) for a in agents]
        await self.db(self.store.add_release, release, targets)
        self._drive(release_id)
        return release_id

    async def _peer_key(self, artifact_id: str) -> str:
        """What agents given this artifact prove to each other to share its chunks: one key per
        artifact (so agents that got it in an earlier release serve it too), from a master secret."""
        secret = await self.db(self.store.get_meta, "peer_secret")
        if secret is None:  # the first of two releases created at once wins: both use its secret
            secret = await self.db(self.store.init_meta, "peer_secret", secrets.token_hex(32))
        return hmac.new(bytes.fromhex(secret), artifact_id.encode(), hashlib.sha256).hexdigest()

    async def act(self, release_id: str, action: str) -> dict[str, Any]:
        rel = await self.get(release_id)
        state = rel["state"]
        if state not in _ALLOWED[action]:
            raise RequestRejected(f"release {release_id} is {state}: it cannot {action} now", kind="release",
                                  status=409)
        new = _MOVES_TO[action]
        if action == ReleaseAction.RESUME:  # the operator accepts the failures so far: the allowance starts again
            failed = sum(t["status"] == TargetStatus.FAILED for t in rel["targets"])
            options = {**rel["options"], "limit": failed + failure_limit(rel["options"]["max_failures"],
                                                                        len(rel["targets"]))}
            await self._set(release_id, options=options)
        await self._set(release_id, state=new, message=f"{action} requested")
        if action in (ReleaseAction.ABORT, ReleaseAction.ROLLBACK) and rel["step_run"]:
            await self._cancel_step(rel["step_run"])  # stop the step the agents are running now
        self._wake(release_id)
        if new in ACTIVE:
            self._drive(release_id)
        return await self.get(release_id)

    async def get(self, release_id: str) -> dict[str, Any]:
        def read() -> tuple[ReleaseRecord | None, list[ReleaseTargetRecord]]:
            return self.store.release(release_id), self.store.release_targets(release_id)

        rel, targets = await self.db(read)
        if rel is None:
            raise RequestRejected(f"no release {release_id!r}", kind="release", status=404)
        # the API's JSON as it was (the SDK reads it): the shard count, no manifest, flags as 0/1
        out: dict[str, Any] = {k: v for k, v in rel.items() if k != "manifest"}
        out["shards"] = len(rel["shards"])
        out["targets"] = [{**t, "placed": int(t["placed"])} for t in targets]
        return out

    async def artifact(self, ref: str) -> ArtifactRecord | None:
        """The artifact a release request names (its id, or the newest of that name)."""
        return await self.db(self.store.artifact, ref)

    async def target_rows(self) -> list[dict[str, Any]]:
        """What a release request's targets are resolved against."""
        return await self.db(self.store.target_rows)

    async def listing(self) -> list[dict[str, Any]]:
        return [_summary(r) for r in await self.db(self.store.releases)]

    # -- the driver ---------------------------------------------------------------------------
    def _drive(self, release_id: str) -> None:
        tg = self.hub.singleton_group  # elsewhere: the singleton holder picks it up from the store
        if release_id in self._driving or tg is None:
            return
        self._driving.add(release_id)
        tg.start_soon(self._run_release, release_id)

    def _wake(self, release_id: str) -> None:
        event = self._woken.pop(release_id, None)
        if event is not None:
            event.set()

    async def _run_release(self, release_id: str) -> None:
        try:
            while await self._advance(release_id):
                pass
        except Exception as exc:  # a driver bug must not take the master down: the release says so
            log.exception("release %s failed", release_id)
            await self._set(release_id, state=ReleaseState.FAILED,
                            message=f"internal error: {type(exc).__name__}: {exc}", expect=ACTIVE)
        finally:
            self._driving.discard(release_id)
        # an operator's resume or rollback between the last step and here found us still driving
        if (await self._row(release_id))["state"] in ACTIVE:
            self._drive(release_id)

    async def _advance(self, release_id: str) -> bool:
        """One step of a release; False when there is nothing more to do now."""
        rel = await self._row(release_id)
        if rel["state"] == ReleaseState.ROLLING_BACK:
            await self._roll_back(rel)
            return False
        if rel["state"] != ReleaseState.RUNNING:
            return False
        shards = rel["shards"]
        if rel["shard"] >= len(shards):
            await self._set(release_id, state=ReleaseState.DONE, message="every shard passed its health checks",
                            expect=ReleaseState.RUNNING)
            return False
        step = Phase(rel["step"] or Phase.FETCH)
        await self._do_step(rel, shards[rel["shard"]], step)
        if await self._over_limit(rel):
            # an operator's abort or rollback meanwhile wins over the pause
            await self._set(release_id, state=ReleaseState.PAUSED, message=await self._pause_message(rel),
                            expect=ReleaseState.RUNNING)
            return False
        if step == STEPS[-1]:
            await self._shard_done(rel)
        else:
            await self._set(release_id, step=STEPS[STEPS.index(step) + 1], step_run="")
        return True

    async def _do_step(self, rel: ReleaseRecord, shard: list[str], step: str) -> None:
        options = rel["options"]
        live = await self._live(rel["id"], shard)
        command = self._command(rel, step, options)
        if command is None or not live:
            return
        run_id = rel["step_run"]
        # not started yet, or its driver stopped (a crash, a lost lease) between storing the
        # step's run id and creating the run; a run in flight is waited for, never redone
        if not run_id or not await self.db(self.store.run_exists, run_id):
            await self._online(live)
            if (await self._row(rel["id"]))["state"] != ReleaseState.RUNNING:
                return  # paused, aborted or rolled back while the targets came back
            # the id is stored before the run exists: whoever drives the release next finds the
            # step's run (or creates it under that id), so the step never runs twice
            run_id = run_id or new_run_id()
            await self._set(rel["id"], step=step, step_run=run_id)
            await self._targets(rel["id"], live, phase=step, started=step == Phase.FETCH)
            await self._create_step_run(rel["id"], run_id, command, live, float(options["timeout"]))
        outcomes = await self._wait_run(run_id)
        await self._record(rel["id"], step, outcomes)

    async def _create_step_run(self, release_id: str, run_id: str, command: tuple[str, dict[str, Any]],
                               live: list[str], timeout: float) -> None:
        cmd, args = command
        try:
            await self.hub.create_run(cmd, args, {"uuids": live}, timeout, run_id=run_id)
        except Exception:
            # two drivers at once (the old lease holder's create still in flight): one insert
            # of the id wins, and the other follows that run
            if not await self.db(self.store.run_exists, run_id):
                raise
            log.info("release %s: run %s of its step was created by another driver; following it", release_id,
                     run_id)
        if (await self._row(release_id))["state"] in _STOPS_STEP:
            await self._cancel_step(run_id)  # an abort or rollback came while the run was being created

    async def _cancel_step(self, run_id: str) -> None:
        """Cancel a step's run; one whose id is stored but not yet created is left to its driver
        (which cancels it once created, seeing the release no longer running)."""
        if await self.db(self.store.run_exists, run_id):
            await self.hub.cancel_run(run_id)

    async def _online(self, uuids: list[str]) -> None:
        """Give targets that are reconnecting (after a master or proxy restart) the time agents
        take to come back, before a step counts them offline."""
        with anyio.move_on_after(self.hub.settings.startup_grace):
            while len(await self.hub.online_uuids(uuids)) < len(set(uuids)):  # noqa: ASYNC110 - polled
                await anyio.sleep(0.5)

    def _command(self, rel: ReleaseRecord, step: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        if step == Phase.FETCH:
            return vocab.RELEASE_FETCH, {"manifest": rel["manifest"], "digest": rel["artifact_id"],
                                        "peer_key": options["peer_key"], "p2p": bool(options.get("p2p", True)),
                                        "rate": float(options.get("rate", 0))}
        if step == Phase.PLACE:
            return vocab.RELEASE_PLACE, {"digest": rel["artifact_id"], "dest": rel["dest"], "mode": options["mode"],
                                        "sha256": rel["manifest"]["sha256"]}
        script = options.get(step)
        return ("shell", {"script": script}) if script else None

    async def _wait_run(self, run_id: str) -> dict[str, dict[str, Any]]:
        while True:
            changed = self.hub.run_changed(run_id)
            if not await self.db(self.store.run_open_count, run_id):
                break
            with anyio.move_on_after(2):
                await changed.wait()
        return await self.db(self.store.run_outcomes, run_id)

    async def _record(self, release_id: str, step: str, outcomes: dict[str, dict[str, Any]]) -> None:
        failed: list[tuple[str, str]] = []
        placed: list[str] = []
        fetched: list[tuple[str, dict[str, Any]]] = []
        for uuid, o in outcomes.items():
            if o["status"] != TaskStatus.OK:
                failed.append((uuid, f"{step}: {o['error'] or o['status']}"))
            elif step == Phase.PLACE and (o["result"] or {}).get("placed"):  # what a rollback may undo
                placed.append(uuid)
            elif step == Phase.FETCH and o["result"]:
                fetched.append((uuid, o["result"]))
        await self.db(self.store.record_release_step, release_id, time.time(), failed, placed, fetched)

    async def _live(self, release_id: str, shard: list[str]) -> list[str]:
        pending = set(await self.db(self.store.pending_release_targets, release_id))
        return [u for u in shard if u in pending]

    async def _targets(self, release_id: str, uuids: list[str], phase: str, started: bool = False) -> None:
        await self.db(self.store.start_release_step, release_id, uuids, phase, time.time() if started else None)

    async def _over_limit(self, rel: ReleaseRecord) -> bool:
        failed = await self.db(self.store.failed_release_targets, rel["id"])
        return failed > int(rel["options"]["limit"])

    async def _pause_message(self, rel: ReleaseRecord) -> str:
        limit = rel["options"]["limit"]
        return f"paused: more than {limit} target(s) failed (see progress); resume, abort or rollback"

    async def _shard_done(self, rel: ReleaseRecord) -> None:
        shards = rel["shards"]
        await self.db(self.store.finish_release_shard, rel["id"], shards[rel["shard"]], time.time())
        await self._set(rel["id"], shard=rel["shard"] + 1, step="", step_run="",
                        message=f"shard {rel['shard'] + 1} of {len(shards)} passed")
        pause = float(rel["options"]["pause_between"])
        if pause > 0 and rel["shard"] + 1 < len(shards):
            self._woken[rel["id"]] = event = anyio.Event()
            with anyio.move_on_after(pause):
                await event.wait()  # a pause or abort ends the wait early

    async def _roll_back(self, rel: ReleaseRecord) -> None:
        options = rel["options"]
        if rel["step_run"]:  # the step that was under way when the rollback came: let it end first
            await self._record(rel["id"], rel["step"], await self._wait_run(rel["step_run"]))
            await self._set(rel["id"], step_run="")
        placed = await self.db(self.store.placed_release_targets, rel["id"])
        failed: list[str] = []
        if placed:
            run = await self.hub.create_run(vocab.RELEASE_ROLLBACK, {"dest": rel["dest"], "digest": rel["artifact_id"]},
                                            {"uuids": placed}, float(options["timeout"]))
            outcomes = await self._wait_run(run["run_id"])
            failed = [u for u, o in outcomes.items() if o["status"] != TaskStatus.OK]
            ok = [u for u in placed if u not in failed]
            if options.get("rollback") and ok:
                run = await self.hub.create_run("shell", {"script": options["rollback"]}, {"uuids": ok},
                                                float(options["timeout"]))
                failed += [u for u, o in (await self._wait_run(run["run_id"])).items() if o["status"] != TaskStatus.OK]
            await self._targets_status(rel["id"], [u for u in placed if u not in failed],
                                       TargetStatus.ROLLED_BACK)
        message = (f"rolled back on {len(placed) - len(failed)} target(s)"
                   + (f"; {len(failed)} could not be rolled back" if failed else ""))
        await self._set(rel["id"], state=ReleaseState.ROLLED_BACK, message=message)

    async def _targets_status(self, release_id: str, uuids: list[str], status: str) -> None:
        await self.db(self.store.set_release_targets_status, release_id, uuids, status)

    async def _row(self, release_id: str) -> ReleaseRecord:
        rel = await self.db(self.store.release, release_id)
        if rel is None:  # releases are never deleted: only a driver bug gets here
            raise LookupError(f"release {release_id} is not in the store")
        return rel

    async def _set(self, release_id: str, expect: str | tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Update a release; with ``expect``, only while it is in that state (an operator's
        action meanwhile is not overwritten). Whether it was updated."""
        fields["updated_at"] = time.time()
        states = (expect,) if isinstance(expect, str) else expect or ()
        return await self.db(self.store.update_release, release_id, fields, states)


def _summary(rel: ReleaseSummary) -> dict[str, Any]:
    out: dict[str, Any] = dict(rel)
    out["shards"] = len(rel["shards"])
    return out
