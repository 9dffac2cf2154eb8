"""SQLite: artifacts (manifests of chunked files) and the releases that roll them out."""

from __future__ import annotations

import sqlite3
from typing import Any, cast

from hcsdk.protocol.wire import loads

from .protocol import ArtifactRecord, ReleaseRecord, ReleaseSummary, ReleaseTargetRecord
from .sqlite_base import SQLiteBase, js

#: release columns an update may set; the JSON ones are encoded here
_RELEASE_FIELDS = {"state", "shard", "step", "step_run", "message", "options", "updated_at"}
_JSON_FIELDS = ("manifest", "options", "shards")
_ARTIFACT = "SELECT id, name, size, sha256, manifest, created_at FROM artifacts"


class ReleasesSQL(SQLiteBase):
    # -- artifacts --------------------------------------------------------------------------
    def add_artifact(self, artifact_id: str, name: str, size: int, sha256: str, manifest: dict[str, Any],
                     created_at: float) -> None:
        """Register an artifact; one already registered (the same manifest) is kept as it was."""
        self.db.execute("INSERT OR IGNORE INTO artifacts VALUES(?,?,?,?,?,?)",
                        (artifact_id, name, size, sha256, js(manifest), created_at))

    def artifacts(self) -> list[ArtifactRecord]:
        return [_artifact(r) for r in self.db.execute(f"{_ARTIFACT} ORDER BY created_at")]

    def artifact(self, ref: str) -> ArtifactRecord | None:
        """By id (its manifest's digest), or the newest of that name."""
        row = self.db.execute(f"{_ARTIFACT} WHERE id=? OR name=? ORDER BY created_at DESC LIMIT 1",
                              (ref, ref)).fetchone()
        return _artifact(row) if row else None

    # -- releases ---------------------------------------------------------------------------
    def add_release(self, release: dict[str, Any], targets: list[tuple[str, str, int]]) -> None:
        """A release (id, artifact_id, name, manifest, dest, options, shards, state, created_at,
        updated_at) and its targets ``(uuid, hostname, shard)``, queued, in one transaction."""
        cols = ("id", "artifact_id", "name", "manifest", "dest", "options", "shards", "state", "created_at",
                "updated_at")
        values = [js(release[c]) if c in _JSON_FIELDS else release[c] for c in cols]
        with self.transaction() as db:
            db.execute(f"INSERT INTO releases({', '.join(cols)}) VALUES({','.join('?' * len(cols))})", values)
            db.executemany("INSERT INTO release_targets(release_id, uuid, hostname, shard, phase, status) "
                           "VALUES(?,?,?,?,?,?)",
                           [(release["id"], uuid, hostname, shard, "queued", "pending")
                            for uuid, hostname, shard in targets])

    def release(self, release_id: str) -> ReleaseRecord | None:
        row = self.db.execute("SELECT * FROM releases WHERE id=?", (release_id,)).fetchone()
        return cast(ReleaseRecord, _release(row)) if row else None

    def release_ids(self, states: tuple[str, ...]) -> list[str]:
        rows = self.db.execute(f"SELECT id FROM releases WHERE state IN ({','.join('?' * len(states))})", states)
        return [r[0] for r in rows]

    def releases(self) -> list[ReleaseSummary]:
        """Every release, oldest first, without manifest, options and targets."""
        rows = self.db.execute("SELECT id, name, dest, state, shard, shards, message, created_at, updated_at "
                               "FROM releases ORDER BY created_at")
        return [cast(ReleaseSummary, _release(r)) for r in rows]

    def update_release(self, release_id: str, fields: dict[str, Any], expect: tuple[str, ...] = ()) -> bool:
        """Set ``fields``; with ``expect``, only while the release is in one of those states.
        Whether it was updated."""
        unknown = set(fields) - _RELEASE_FIELDS
        if unknown:
            raise ValueError(f"not a release field: {sorted(unknown)}")
        cols = ", ".join(f"{k}=?" for k in fields)
        where = f" AND state IN ({','.join('?' * len(expect))})" if expect else ""
        values = [js(v) if k in _JSON_FIELDS else v for k, v in fields.items()]
        return self.db.execute(f"UPDATE releases SET {cols} WHERE id=?{where}",
                               (*values, release_id, *expect)).rowcount > 0

    # -- a release's targets ----------------------------------------------------------------
    def release_targets(self, release_id: str) -> list[ReleaseTargetRecord]:
        rows = self.db.execute("SELECT * FROM release_targets WHERE release_id=? ORDER BY shard, hostname",
                               (release_id,))
        return [cast(ReleaseTargetRecord, {**dict(r), "placed": bool(r["placed"])}) for r in rows]

    def pending_release_targets(self, release_id: str) -> list[str]:
        """Targets that have neither failed nor finished."""
        rows = self.db.execute("SELECT uuid FROM release_targets WHERE release_id=? AND status='pending'",
                               (release_id,))
        return [r[0] for r in rows]

    def placed_release_targets(self, release_id: str) -> list[str]:
        """Targets where the artifact was placed (what a rollback undoes)."""
        rows = self.db.execute("SELECT uuid FROM release_targets WHERE release_id=? AND placed=1", (release_id,))
        return [r[0] for r in rows]

    def failed_release_targets(self, release_id: str) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM release_targets WHERE release_id=? AND status='failed'",
                              (release_id,)).fetchone()
        return int(row[0])

    def start_release_step(self, release_id: str, uuids: list[str], phase: str, started_at: float | None) -> None:
        """Pending targets enter ``phase``; ``started_at`` (the first step) is kept once set."""
        with self.transaction() as db:
            db.executemany("UPDATE release_targets SET phase=?, started_at=COALESCE(started_at, ?) "
                           "WHERE release_id=? AND uuid=? AND status='pending'",
                           [(phase, started_at, release_id, u) for u in uuids])

    def record_release_step(self, release_id: str, now: float, failed: list[tuple[str, str]], placed: list[str],
                            fetched: list[tuple[str, dict[str, Any]]]) -> None:
        """What a step did: targets that failed ``(uuid, error)``, where the file was placed, and
        the fetch figures ``(uuid, result)`` of those that fetched."""
        with self.transaction() as db:
            db.executemany("UPDATE release_targets SET status='failed', error=?, finished_at=? "
                           "WHERE release_id=? AND uuid=?", [(e, now, release_id, u) for u, e in failed])
            db.executemany("UPDATE release_targets SET placed=1 WHERE release_id=? AND uuid=?",
                           [(release_id, u) for u in placed])
            db.executemany("UPDATE release_targets SET bytes=?, bytes_upstream=?, bytes_peers=?, reused=?, "
                           "fetch_s=? WHERE release_id=? AND uuid=?",
                           [(r.get("size"), r.get("bytes_upstream"), r.get("bytes_peers", 0), r.get("reused"),
                             r.get("seconds"), release_id, u) for u, r in fetched])

    def finish_release_shard(self, release_id: str, uuids: list[str], now: float) -> None:
        """The shard's targets that are still pending passed every step."""
        with self.transaction() as db:
            db.executemany("UPDATE release_targets SET phase='done', status='ok', finished_at=? "
                           "WHERE release_id=? AND uuid=? AND status='pending'", [(now, release_id, u) for u in uuids])

    def set_release_targets_status(self, release_id: str, uuids: list[str], status: str) -> None:
        """Status and phase both (``rolled_back``)."""
        with self.transaction() as db:
            db.executemany("UPDATE release_targets SET status=?, phase=? WHERE release_id=? AND uuid=?",
                           [(status, status, release_id, u) for u in uuids])


def _artifact(row: sqlite3.Row) -> ArtifactRecord:
    return cast(ArtifactRecord, {**dict(row), "manifest": loads(row["manifest"])})


def _release(row: sqlite3.Row) -> dict[str, Any]:
    """A row with its JSON columns decoded (the caller says which record it is)."""
    out = dict(row)
    for key in _JSON_FIELDS:
        if key in out:
            out[key] = loads(out[key])
    return out
