"""PostgreSQL: artifacts (manifests of chunked files) and the releases that roll them out (as
sqlite_releases.py)."""

from __future__ import annotations

import math
from typing import Any, cast

from hcsdk.protocol.wire import loads

from .postgres_base import PostgresBase, clean_or_none, js
from .protocol import ArtifactRecord, ReleaseRecord, ReleaseSummary, ReleaseTargetRecord

#: release columns an update may set (names checked against this before they reach SQL); the
#: JSON ones are encoded here
_RELEASE_FIELDS = {"state", "shard", "step", "step_run", "message", "options", "updated_at"}
_JSON_FIELDS = ("manifest", "options", "shards")
_ARTIFACT = "SELECT id, name, size, sha256, manifest, created_at FROM artifacts"
_TARGET_UPDATE = "UPDATE release_targets SET {} WHERE release_id=%s AND uuid=%s"


class PostgresReleasesSQL(PostgresBase):
    # -- artifacts --------------------------------------------------------------------------
    def add_artifact(self, artifact_id: str, name: str, size: int, sha256: str, manifest: dict[str, Any],
                     created_at: float) -> None:
        """Register an artifact; one already registered (the same manifest) is kept as it was."""
        self.write("INSERT INTO artifacts(id, name, size, sha256, manifest, created_at) VALUES(%s,%s,%s,%s,%s,%s) "
                   "ON CONFLICT DO NOTHING", (artifact_id, name, size, sha256, js(manifest), created_at))

    def artifacts(self) -> list[ArtifactRecord]:
        return [_artifact(r) for r in self.all(f"{_ARTIFACT} ORDER BY created_at")]

    def artifact(self, ref: str) -> ArtifactRecord | None:
        """By id (its manifest's digest), or the newest of that name."""
        row = self.one(f"{_ARTIFACT} WHERE id=%s OR name=%s ORDER BY created_at DESC LIMIT 1", (ref, ref))
        return _artifact(row) if row else None

    # -- releases ---------------------------------------------------------------------------
    def add_release(self, release: dict[str, Any], targets: list[tuple[str, str, int]]) -> None:
        """A release and its targets ``(uuid, hostname, shard)``, queued, in one transaction."""
        cols = ("id", "artifact_id", "name", "manifest", "dest", "options", "shards", "state", "created_at",
                "updated_at")
        values = [js(release[c]) if c in _JSON_FIELDS else release[c] for c in cols]
        with self.transaction() as conn:
            conn.execute(f"INSERT INTO releases({', '.join(cols)}) VALUES({','.join(['%s'] * len(cols))})", values)
            if targets:
                conn.execute("INSERT INTO release_targets(release_id, uuid, hostname, shard, phase, status) "
                             "SELECT %s, u, h, s, 'queued', 'pending' FROM unnest(%s::text[], %s::text[], %s::int[]) "
                             "AS v(u, h, s)", (release["id"], [t[0] for t in targets], [t[1] for t in targets],
                                               [t[2] for t in targets]))

    def release(self, release_id: str) -> ReleaseRecord | None:
        row = self.one("SELECT * FROM releases WHERE id=%s", (release_id,))
        return cast(ReleaseRecord, _release(row)) if row else None

    def release_ids(self, states: tuple[str, ...]) -> list[str]:
        return [r["id"] for r in self.all("SELECT id FROM releases WHERE state = ANY(%s)", (list(states),))]

    def releases(self) -> list[ReleaseSummary]:
        """Every release, oldest first, without manifest, options and targets."""
        rows = self.all("SELECT id, name, dest, state, shard, shards, message, created_at, updated_at "
                        "FROM releases ORDER BY created_at")
        return [cast(ReleaseSummary, _release(r)) for r in rows]

    def update_release(self, release_id: str, fields: dict[str, Any], expect: tuple[str, ...] = ()) -> bool:
        """Set ``fields``; with ``expect``, only while the release is in one of those states.
        Whether it was updated."""
        unknown = set(fields) - _RELEASE_FIELDS
        if unknown:
            raise ValueError(f"not a release field: {sorted(unknown)}")
        cols = ", ".join(f"{k}=%s" for k in fields)
        where = " AND state = ANY(%s)" if expect else ""
        values = [js(v) if k in _JSON_FIELDS else v for k, v in fields.items()]
        params = (*values, release_id, list(expect)) if expect else (*values, release_id)
        return self.write(f"UPDATE releases SET {cols} WHERE id=%s{where}", params) > 0

    # -- a release's targets ----------------------------------------------------------------
    def release_targets(self, release_id: str) -> list[ReleaseTargetRecord]:
        rows = self.all("SELECT * FROM release_targets WHERE release_id=%s ORDER BY shard, hostname", (release_id,))
        return cast(list[ReleaseTargetRecord], rows)

    def pending_release_targets(self, release_id: str) -> list[str]:
        """Targets that have neither failed nor finished."""
        rows = self.all("SELECT uuid FROM release_targets WHERE release_id=%s AND status='pending'", (release_id,))
        return [r["uuid"] for r in rows]

    def placed_release_targets(self, release_id: str) -> list[str]:
        """Targets where the artifact was placed (what a rollback undoes)."""
        rows = self.all("SELECT uuid FROM release_targets WHERE release_id=%s AND placed", (release_id,))
        return [r["uuid"] for r in rows]

    def failed_release_targets(self, release_id: str) -> int:
        row = self.one("SELECT COUNT(*) AS n FROM release_targets WHERE release_id=%s AND status='failed'",
                       (release_id,))
        return int(row["n"]) if row else 0

    def start_release_step(self, release_id: str, uuids: list[str], phase: str, started_at: float | None) -> None:
        """Pending targets enter ``phase``; ``started_at`` (the first step) is kept once set."""
        with self.transaction() as conn, conn.cursor() as cur:
            cur.executemany("UPDATE release_targets SET phase=%s, started_at=COALESCE(started_at, %s) "
                            "WHERE release_id=%s AND uuid=%s AND status='pending'",
                            [(phase, started_at, release_id, u) for u in uuids])

    def record_release_step(self, release_id: str, now: float, failed: list[tuple[str, str]], placed: list[str],
                            fetched: list[tuple[str, dict[str, Any]]]) -> None:
        """What a step did: targets that failed ``(uuid, error)``, where the file was placed, and
        the fetch figures ``(uuid, result)`` of those that fetched."""
        with self.transaction() as conn, conn.cursor() as cur:
            cur.executemany(_TARGET_UPDATE.format("status='failed', error=%s, finished_at=%s"),
                            [(clean_or_none(e), now, release_id, u) for u, e in failed])
            cur.executemany(_TARGET_UPDATE.format("placed=true"), [(release_id, u) for u in placed])
            cur.executemany(_TARGET_UPDATE.format("bytes=%s, bytes_upstream=%s, bytes_peers=%s, reused=%s, fetch_s=%s"),
                            [(_count(r.get("size")), _count(r.get("bytes_upstream")), _count(r.get("bytes_peers", 0)),
                              _count(r.get("reused")), _seconds(r.get("seconds")), release_id, u)
                             for u, r in fetched])

    def finish_release_shard(self, release_id: str, uuids: list[str], now: float) -> None:
        """The shard's targets that are still pending passed every step."""
        with self.transaction() as conn, conn.cursor() as cur:
            cur.executemany("UPDATE release_targets SET phase='done', status='ok', finished_at=%s "
                            "WHERE release_id=%s AND uuid=%s AND status='pending'",
                            [(now, release_id, u) for u in uuids])

    def set_release_targets_status(self, release_id: str, uuids: list[str], status: str) -> None:
        """Status and phase both (``rolled_back``)."""
        with self.transaction() as conn, conn.cursor() as cur:
            cur.executemany(_TARGET_UPDATE.format("status=%s, phase=%s"),
                            [(status, status, release_id, u) for u in uuids])


def _count(value: Any) -> int | None:
    """A figure an agent reported, as the bigint column takes it: anything else (a string, a
    number past 2**63) is stored as unknown rather than failing the release's step (SQLite
    keeps whatever came)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value) if abs(value) < 2**63 else None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300:
        return None
    return float(value) if math.isfinite(value) else None


def _artifact(row: dict[str, Any]) -> ArtifactRecord:
    row["manifest"] = loads(row["manifest"])
    return cast(ArtifactRecord, row)


def _release(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its JSON columns decoded (the caller says which record it is)."""
    for key in _JSON_FIELDS:
        if key in row:
            row[key] = loads(row[key])
    return row
