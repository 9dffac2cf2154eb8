"""What the master needs of its durable state: the ``Store`` protocol.

Everything the master keeps goes through these methods; ``SQLiteStore`` implements them over
one SQLite file and ``PostgresStore`` over one PostgreSQL database shared by several masters.
They are synchronous and are called from worker threads (``StoreThread``): one at a time on
SQLite, a few at once (and from other masters) on PostgreSQL. Records are plain dicts (the
keys are the column names the API returns today), with JSON columns already decoded except
where noted; no database type appears here. The fleet's records (tokens, agents and proxies,
artifacts, releases) are the typed dicts below, in Python's types: JSON as dicts and lists, keys
as bytes, flags as bools, whatever the database stores them as.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NotRequired, Protocol, TypeAlias, TypedDict

from hcsdk.protocol.messages import Done, Out, Sample, Start

#: what an agent reports about a task (or a schedule's tick), parsed and MAC-checked: what
#: ``Store.ingest`` takes
Result: TypeAlias = Start | Out | Done | Sample


class JoinTokenRecord(TypedDict):
    id: str
    secret_hash: NotRequired[str]  # join_token() only: a listing leaves the secret's hash out
    created_at: float
    expires_at: float
    revoked: bool
    description: str
    uses: int
    kind: str
    proxy_names: list[str]
    max_uses: int


class AgentRecord(TypedDict):
    """An enrolled agent or proxy (``kind``)."""

    uuid: str
    credential_hash: str
    token_id: str
    hostname: str
    facts: dict[str, Any]
    labels: dict[str, str]
    enrolled_at: float
    last_seen: float | None
    revoked: bool
    connects: int
    e2e_key: bytes  # the end-to-end MAC key (empty for an agent enrolled before there was one)
    kind: str | None  # None: enrolled before kinds existed (an agent)


class ArtifactRecord(TypedDict):
    id: str
    name: str
    size: int
    sha256: str
    manifest: dict[str, Any]
    created_at: float


class ReleaseSummary(TypedDict):
    """A release as a listing shows it."""

    id: str
    name: str
    dest: str
    state: str
    shard: int
    shards: list[list[str]]
    message: str
    created_at: float
    updated_at: float


class ReleaseRecord(ReleaseSummary):
    artifact_id: str
    manifest: dict[str, Any]
    options: dict[str, Any]
    step: str
    step_run: str


class ReleaseTargetRecord(TypedDict):
    release_id: str
    uuid: str
    hostname: str
    shard: int
    phase: str
    status: str
    error: str | None
    bytes: int | None
    bytes_upstream: int | None
    bytes_peers: int | None
    reused: int | None
    fetch_s: float | None
    started_at: float | None
    finished_at: float | None
    placed: bool


class MasterRecord(TypedDict):
    """A master of the cluster as the registry has it."""

    id: str
    urls: list[str]
    started_at: float
    heartbeat_at: float  # by the store's clock (PostgreSQL's: compare ``heartbeat_age``, not time.time())
    heartbeat_age: float  # seconds since its last heartbeat, by the store's clock: free of masters' skew
    agents: int  # sessions it held at its last heartbeat
    singleton: bool  # it holds the unexpired lease ``singleton`` (runs the cluster's singleton work)


class Store(Protocol):
    def close(self) -> None: ...

    def schema_versions(self) -> dict[int, float]:
        """Applied schema migration -> when it was applied."""
        ...

    # -- meta: small named values -----------------------------------------------------------
    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def init_meta(self, key: str, value: str) -> str:
        """The value of ``key``, set to ``value`` first if it has none."""
        ...

    # -- join tokens ------------------------------------------------------------------------
    def add_join_token(self, token_id: str, secret_hash: str, ttl: float, description: str, kind: str = "agent",
                       proxy_names: Iterable[str] = (), max_uses: int = 0) -> JoinTokenRecord: ...
    def join_token(self, token_id: str) -> JoinTokenRecord | None: ...
    def join_tokens(self) -> list[JoinTokenRecord]: ...
    def revoke_join_token(self, token_id: str) -> bool: ...

    # -- agents and proxies -----------------------------------------------------------------
    def enroll(self, uuid: str, credential_hash: str, token_id: str, facts: dict[str, Any],
               labels: dict[str, str], e2e_key: bytes, kind: str = "agent") -> list[str]:
        """Record an enrollment and count a use of the token (raises ``TokenUsedUp``) together;
        returns the other live clients of this kind with the same hostname."""
        ...

    def agent(self, uuid: str) -> AgentRecord | None: ...

    def agent_connected(self, uuid: str, facts: dict[str, Any], labels: dict[str, str]) -> None: ...
    def touch_agents(self, seen: dict[str, float]) -> None: ...
    def revoke_agent(self, uuid: str) -> bool: ...
    def agents(self, include_revoked: bool = False) -> list[AgentRecord]: ...
    def target_rows(self) -> list[dict[str, Any]]:
        """uuid, hostname, labels of every live agent (not proxies): what targeting needs."""
        ...

    def target_row(self, uuid: str) -> dict[str, Any] | None: ...

    # -- runs, tasks, events ----------------------------------------------------------------
    def create_run(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float,
                   tasks: list[tuple[str, str, str, float]],
                   holder: tuple[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
        """A run and its tasks ``(taskid, uuid, status, deadline)``; returns the ``done`` events
        of tasks created final. ``holder``: as ``create_run_held`` (which also says which
        tasks it stored dispatched)."""
        ...

    def create_run_held(self, run_id: str, cmd: str, args: dict[str, Any], timeout: float,
                        tasks: list[tuple[str, str, str, float]], holder: tuple[str, dict[str, int]] | None
                        ) -> tuple[list[dict[str, Any]], list[str]]:
        """``create_run``; with ``holder`` = (this master's id, {uuid: its local session's
        epoch}) a task given as dispatched is stored so only if the store's session of its agent
        is this master's at that epoch, in the same transaction (PostgreSQL: the session rows
        read FOR SHARE, so a claim elsewhere waits for the commit and its redelivery sees the
        task); else it is stored pending, for the agent's holder to send. Returns the done
        events and the taskids stored dispatched: only those are the caller's to send."""
        ...

    def task(self, taskid: str) -> dict[str, Any] | None: ...
    def task_runs(self, taskids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """taskid -> (run_id, uuid)."""
        ...

    def ingest(self, batch: list[tuple[str, Result]]) -> tuple[dict[str, list[list[Any]]], set[str]]:
        """Store ``(uuid, message)`` from agents in one transaction; returns the
        acknowledgements per agent and the runs that changed."""
        ...

    def open_tasks_for(self, uuid: str) -> list[dict[str, Any]]: ...
    def mark_dispatched(self, taskids: list[str]) -> None: ...
    def claim_pending(self, taskids: list[str]) -> list[str]:
        """Of ``taskids``, those still pending and not asked to cancel, now dispatched, in one
        statement: a holder sends a pending task only if it claimed it (then a cancel_pending
        after it sees it dispatched and its cancel goes out; one before it leaves it out)."""
        ...

    def finish_by_master(self, items: list[tuple[str, str, str]]) -> set[str]:
        """Final ``(taskid, status, error)`` decided by the master; returns the runs that changed."""
        ...

    def finish_unheld(self, items: list[tuple[str, str, str]]) -> set[str]:
        """``finish_by_master`` for tasks whose agent's session nobody holds at the moment the
        verdict is written (the same statement checks it): a task whose agent a master has
        claimed since it was read is left for that master to deliver."""
        ...

    def request_cancel(self, run_id: str) -> list[dict[str, Any]]: ...
    def cancel_pending(self, run_id: str) -> tuple[list[dict[str, Any]], set[str]]:
        """``request_cancel`` and, in the same transaction, the run's still-pending tasks
        finished ``cancelled before the agent received it`` (no claim_pending in between).
        Returns the open tasks left (``taskid, uuid, status``: dispatched or running, whose
        cancels must go out) and the runs that changed (to notify)."""
        ...
    def overdue_tasks(self, now: float) -> list[dict[str, Any]]: ...
    def open_task_agents(self) -> list[str]: ...
    def run(self, run_id: str) -> dict[str, Any] | None: ...
    def run_exists(self, run_id: str) -> bool: ...
    def run_open_count(self, run_id: str) -> int: ...
    def events_after(self, run_id: str, cursor: int, limit: int = 2000) -> list[dict[str, Any]]:
        """Events past ``cursor`` (their ``data`` as JSON text: the API passes it through)."""
        ...

    def run_outcomes(self, run_id: str) -> dict[str, dict[str, Any]]:
        """uuid -> ``{status, error, result}`` for each task of the run."""
        ...

    # -- schedules and samples --------------------------------------------------------------
    def put_schedule(self, name: str, cmd: str, args: dict[str, Any], every: float, timeout: float,
                     targets: dict[str, Any]) -> None: ...
    def schedule(self, name: str) -> dict[str, Any] | None: ...
    def schedules(self) -> list[dict[str, Any]]: ...
    def schedule_specs(self) -> list[dict[str, Any]]: ...
    def delete_schedule(self, name: str) -> None: ...
    def forget_samples(self, before: float) -> int: ...
    def series(self, name: str, since: float | None, until: float | None, limit: int) -> list[dict[str, Any]]: ...
    def schedules_given(self, uuid: str) -> set[str]:
        """Names of every schedule ever sent to ``uuid``."""
        ...

    # -- artifacts --------------------------------------------------------------------------
    def add_artifact(self, artifact_id: str, name: str, size: int, sha256: str, manifest: dict[str, Any],
                     created_at: float) -> None: ...
    def artifacts(self) -> list[ArtifactRecord]: ...
    def artifact(self, ref: str) -> ArtifactRecord | None:
        """By id, or the newest of that name."""
        ...

    # -- releases ---------------------------------------------------------------------------
    def add_release(self, release: dict[str, Any], targets: list[tuple[str, str, int]]) -> None: ...
    def release(self, release_id: str) -> ReleaseRecord | None: ...
    def release_ids(self, states: tuple[str, ...]) -> list[str]: ...
    def releases(self) -> list[ReleaseSummary]: ...
    def update_release(self, release_id: str, fields: dict[str, Any], expect: tuple[str, ...] = ()) -> bool: ...
    def release_targets(self, release_id: str) -> list[ReleaseTargetRecord]: ...
    def pending_release_targets(self, release_id: str) -> list[str]: ...
    def placed_release_targets(self, release_id: str) -> list[str]: ...
    def failed_release_targets(self, release_id: str) -> int: ...
    def start_release_step(self, release_id: str, uuids: list[str], phase: str, started_at: float | None) -> None: ...
    def record_release_step(self, release_id: str, now: float, failed: list[tuple[str, str]], placed: list[str],
                            fetched: list[tuple[str, dict[str, Any]]]) -> None: ...
    def finish_release_shard(self, release_id: str, uuids: list[str], now: float) -> None: ...
    def set_release_targets_status(self, release_id: str, uuids: list[str], status: str) -> None: ...

    # -- cluster: masters, sessions, leases (issue 15; one master holds everything on SQLite) --
    # Times: on SQLite the caller's clock (``now``, one master's view); on PostgreSQL the
    # database's, ``now`` counting only as an offset from the caller's ``time.time()`` (so the
    # masters' skew cancels out: postgres_cluster.py).
    def register_master(self, master_id: str, urls: list[str], now: float, instance: str = "") -> None:
        """Add (or restart) ``master_id`` in the registry with its URLs, unconditionally."""
        ...

    def join_master(self, master_id: str, instance: str, urls: list[str], now: float, dead_after: float,
                    stale_beat: float | None = None) -> bool:
        """Register ``master_id`` as the process ``instance`` (a random token per process),
        atomically, unless another process of that id still heartbeats: the row is taken when
        absent, already ``instance``'s, silent for ``dead_after``, or its ``heartbeat_at`` is
        still ``stale_beat`` (seen by the caller earlier and not renewed since). False: refused."""
        ...

    def master_instance(self, master_id: str) -> tuple[str, float, float] | None:
        """(instance, heartbeat_at, seconds since that heartbeat) of ``master_id``'s row."""
        ...

    def master_heartbeat(self, master_id: str, agents: int, now: float, instance: str | None = None) -> bool:
        """Note a heartbeat; False when the registry no longer has ``master_id`` (it was taken
        for dead and forgotten: register again and claim the sessions held again) or, given
        ``instance``, when another process of that id holds the row now."""
        ...

    def masters(self) -> list[MasterRecord]: ...
    def forget_master(self, master_id: str) -> None:
        """Take ``master_id`` out of the registry and drop the leases it holds."""
        ...

    def dead_masters(self, now: float, dead_after: float) -> list[str]:
        """Masters whose last heartbeat is more than ``dead_after`` seconds old."""
        ...

    def take_lease(self, name: str, holder: str, ttl: float, now: float, instance: str | None = None) -> bool:
        """Acquire ``name`` if it is free, expired or already ``holder``'s (then renew it) until
        ``now + ttl``, atomically; False if another holder has it, or, given ``instance``, when
        the registry's row of ``holder`` is another process's (a stale twin renews nothing)."""
        ...

    def release_lease(self, name: str, holder: str) -> None: ...
    def lease_holder(self, name: str, now: float) -> str | None: ...

    def claim_session(self, uuid: str, master_id: str, now: float) -> int:
        """``master_id`` holds ``uuid``'s session from now: epoch + 1; returns the new epoch."""
        ...

    def reclaim_session(self, uuid: str, master_id: str, epoch: int) -> int | None:
        """Claim ``uuid``'s session again only if it is still as ``master_id`` left it: at
        ``epoch`` and held by ``master_id`` or by nobody (a master the others took for dead
        takes back its sessions, never one an agent moved elsewhere). The new epoch, or None
        when it moved on: the caller closes its own session of that agent."""
        ...

    def drop_session(self, uuid: str, master_id: str, epoch: int) -> bool:
        """Let go of ``uuid``'s session if ``master_id`` still holds it at ``epoch``."""
        ...

    def session_holders(self, uuids: list[str] | None = None) -> dict[str, tuple[str, int]]:
        """uuid -> (master_id, epoch) of held sessions (of ``uuids``, or all)."""
        ...

    def drop_sessions_of(self, master_id: str) -> list[str]:
        """Drop every session ``master_id`` holds; returns their uuids."""
        ...

    def pending_tasks_held_by(self, master_id: str) -> list[dict[str, Any]]:
        """Open tasks still ``pending`` whose agent's session ``master_id`` holds, with the columns
        of ``open_tasks_for`` and the agent's ``uuid``."""
        ...

    def cancels_held_by(self, master_id: str) -> list[dict[str, Any]]:
        """``taskid, run_id, uuid, status`` of dispatched or running tasks asked to cancel whose
        agent's session ``master_id`` holds."""
        ...
