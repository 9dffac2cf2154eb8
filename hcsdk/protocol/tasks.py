"""The task lifecycle and the session states, as enums and transition tables (no I/O).

A task is created ``dispatched`` (its agent is online) or already final (``offline``); the store
moves it with the agent's messages: ``start`` makes it ``running``, ``done`` makes it final. The
master decides a final status itself when the agent cannot (offline, timeout, cancelled before
delivery). One exception to "final is final" is not a move of the lifecycle but a correction:
an agent's own verdict replaces one the master only presumed (``Verdict.MASTER``), see
:func:`may_settle`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FINAL", "OPEN", "SESSION_TRANSITIONS", "TRANSITIONS", "ChannelMode", "SessionKind", "SessionState",
           "TaskStatus", "Verdict", "can_move", "is_final", "may_settle"]


class TaskStatus(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    OFFLINE = "offline"
    CANCELLED = "cancelled"
    ERROR = "error"


#: final statuses, in the order the store, the SDK and error messages list them
FINAL: tuple[TaskStatus, ...] = (TaskStatus.OK, TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.OFFLINE,
                                 TaskStatus.CANCELLED, TaskStatus.ERROR)
#: statuses of a task that may still change
OPEN: tuple[TaskStatus, ...] = (TaskStatus.PENDING, TaskStatus.DISPATCHED, TaskStatus.RUNNING)
# plain str members hash like the enum's values: a set lookup accepts either
_FINAL_SET = frozenset(FINAL)

#: status -> the statuses it may move to (final ones move nowhere)
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.DISPATCHED, TaskStatus.RUNNING, *FINAL}),
    TaskStatus.DISPATCHED: frozenset({TaskStatus.RUNNING, *FINAL}),
    TaskStatus.RUNNING: frozenset(FINAL),
    **{status: frozenset() for status in FINAL},
}


def is_final(status: str) -> bool:
    return isinstance(status, str) and status in _FINAL_SET


def can_move(a: str, b: str) -> bool:
    """Whether a task in status ``a`` may move to ``b`` (either may be a plain string)."""
    try:
        return TaskStatus(b) in TRANSITIONS[TaskStatus(a)]
    except ValueError:
        return False


class Verdict(StrEnum):
    """Who decided a task's final status (the store's ``final_source``)."""

    AGENT = "agent"
    MASTER = "master"


def may_settle(status: str, decided_by: str | None) -> bool:
    """Whether an agent's ``done`` may set the final status of a task now in ``status``: an
    open one, or one the master only presumed (e.g. "agent is offline") and the agent knows better."""
    return not is_final(status) or decided_by == Verdict.MASTER


class SessionState(StrEnum):
    """An agent as the master's hub sees it: ``online`` (in ``Hub.sessions``), ``retiring`` (the old
    build of an updating agent: its uplink stays open to report what it still runs, new work goes
    to the new build) or ``offline`` (no session; its open tasks are written off after a grace)."""

    ONLINE = "online"
    RETIRING = "retiring"
    OFFLINE = "offline"


#: ONLINE -> RETIRING on a handover handshake; RETIRING -> ONLINE when the new build dies first
SESSION_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.OFFLINE: frozenset({SessionState.ONLINE}),
    SessionState.ONLINE: frozenset({SessionState.RETIRING, SessionState.OFFLINE}),
    SessionState.RETIRING: frozenset({SessionState.ONLINE, SessionState.OFFLINE}),
}


class SessionKind(StrEnum):
    """What is at the other end of a channel session."""

    AGENT = "agent"
    PROXY = "proxy"


class ChannelMode(StrEnum):
    """How a session's channel runs: ``h2`` (two long-lived HTTP/2 streams) or ``poll`` (the
    HTTP/1.1 fallback: uplink batches in, downlink batches out)."""

    H2 = "h2"
    POLL = "poll"
