"""A release's vocabulary, defined once for the master (which drives releases and stores these
words) and the SDK (which waits for them): the release states, the steps and phases a target
goes through, and a target's status. Plain ``str`` values compare equal to the members, so
what the store and the REST API carry (the value) needs no conversion."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ACTIVE", "FINISHED", "STEPS", "Phase", "ReleaseAction", "ReleaseState", "TargetStatus"]


class ReleaseState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


#: states the master drives a release in (after a restart too)
ACTIVE: tuple[ReleaseState, ...] = (ReleaseState.RUNNING, ReleaseState.ROLLING_BACK)
#: states a release stays in until an operator acts (what ``Release.wait`` waits for)
FINISHED: tuple[ReleaseState, ...] = (ReleaseState.DONE, ReleaseState.PAUSED, ReleaseState.ABORTED,
                                      ReleaseState.ROLLED_BACK, ReleaseState.FAILED)


class ReleaseAction(StrEnum):
    """What an operator asks of a release (``POST /api/v1/releases/{id}/{action}``)."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"


class Phase(StrEnum):
    """Where a target is in its release: queued, one of the steps, then done or rolled back."""

    QUEUED = "queued"
    FETCH = "fetch"
    PRE = "pre"
    PLACE = "place"
    POST = "post"
    HEALTH = "health"
    DONE = "done"
    ROLLED_BACK = "rolled_back"


#: each shard's steps, in order: each is a run over the shard's targets that have not failed
STEPS: tuple[Phase, ...] = (Phase.FETCH, Phase.PRE, Phase.PLACE, Phase.POST, Phase.HEALTH)


class TargetStatus(StrEnum):
    """A target's status in a release: pending until it failed or its shard passed every step."""

    PENDING = "pending"
    OK = "ok"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
