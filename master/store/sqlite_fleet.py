"""SQLite: join tokens and the enrolled agents and proxies."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any, cast

from hcsdk.protocol.wire import loads

from .errors import TokenUsedUp
from .protocol import AgentRecord, JoinTokenRecord
from .sqlite_base import SQLiteBase, js


class FleetSQL(SQLiteBase):
    # -- join tokens ------------------------------------------------------------------------
    def add_join_token(self, token_id: str, secret_hash: str, ttl: float, description: str, kind: str = "agent",
                       proxy_names: Iterable[str] = (), max_uses: int = 0) -> JoinTokenRecord:
        """``max_uses`` 0: any number of enrollments until it expires."""
        now = time.time()
        self.db.execute(
            "INSERT INTO join_tokens(id, secret_hash, created_at, expires_at, description, kind, proxy_names, "
            "max_uses) VALUES(?,?,?,?,?,?,?,?)",
            (token_id, secret_hash, now, now + ttl, description, kind, js(list(proxy_names)), max_uses),
        )
        row = self.join_token(token_id)
        assert row is not None  # inserted just above, in this connection
        return row

    def join_token(self, token_id: str) -> JoinTokenRecord | None:
        row = self.db.execute("SELECT * FROM join_tokens WHERE id=?", (token_id,)).fetchone()
        return _token(row) if row else None

    def join_tokens(self) -> list[JoinTokenRecord]:
        rows = self.db.execute(
            "SELECT id, created_at, expires_at, revoked, description, uses, kind, proxy_names, max_uses "
            "FROM join_tokens ORDER BY created_at"
        )
        return [_token(r) for r in rows]

    def revoke_join_token(self, token_id: str) -> bool:
        return self.db.execute("UPDATE join_tokens SET revoked=1 WHERE id=?", (token_id,)).rowcount > 0

    def _claim_token(self, token_id: str, uuid: str) -> None:
        """Count one use of the token, in the enrollment's transaction: of two enrollments racing
        for a token's last use exactly one gets it. Enrolling the same uuid again (an agent that
        crashed before saving its credential) is not another use."""
        again = self.db.execute("SELECT 1 FROM agents WHERE uuid=? AND token_id=?", (uuid, token_id)).fetchone()
        if again:
            return
        claimed = self.db.execute("UPDATE join_tokens SET uses=uses+1 WHERE id=? AND (max_uses=0 OR uses<max_uses)",
                                  (token_id,)).rowcount
        if not claimed:
            raise TokenUsedUp(token_id)

    # -- agents -----------------------------------------------------------------------------
    def enroll(self, uuid: str, credential_hash: str, token_id: str, facts: dict[str, Any],
               labels: dict[str, str], e2e_key: bytes, kind: str = "agent") -> list[str]:
        """Returns the other enrolled (not revoked) clients of this kind reporting the same
        hostname, for a warning. Raises TokenUsedUp when the token has no use left."""
        hostname = str(facts.get("hostname", ""))
        with self.transaction() as db:
            self._claim_token(token_id, uuid)
            db.execute(
                "INSERT INTO agents(uuid, credential_hash, token_id, hostname, facts, labels, enrolled_at, e2e_key, "
                "kind) VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(uuid) DO UPDATE SET "
                "credential_hash=excluded.credential_hash, e2e_key=excluded.e2e_key",
                (uuid, credential_hash, token_id, hostname, js(facts), js(labels), time.time(), e2e_key.hex(), kind),
            )
            same = db.execute("SELECT uuid FROM agents WHERE hostname=? AND kind=? AND uuid<>? AND revoked=0 "
                              "LIMIT 5", (hostname, kind, uuid)).fetchall() if hostname else []
        return [r[0] for r in same]

    def agent(self, uuid: str) -> AgentRecord | None:
        row = self.db.execute("SELECT * FROM agents WHERE uuid=?", (uuid,)).fetchone()
        return _agent(row) if row else None

    def agent_connected(self, uuid: str, facts: dict[str, Any], labels: dict[str, str]) -> None:
        self.db.execute(
            "UPDATE agents SET hostname=?, facts=?, labels=?, last_seen=?, connects=connects+1 WHERE uuid=?",
            (str(facts.get("hostname", "")), js(facts), js(labels), time.time(), uuid),
        )

    def touch_agents(self, seen: dict[str, float]) -> None:
        self.db.executemany("UPDATE agents SET last_seen=? WHERE uuid=?", [(t, u) for u, t in seen.items()])

    def revoke_agent(self, uuid: str) -> bool:
        return self.db.execute("UPDATE agents SET revoked=1 WHERE uuid=?", (uuid,)).rowcount > 0

    def agents(self, include_revoked: bool = False) -> list[AgentRecord]:
        sql = "SELECT * FROM agents" + ("" if include_revoked else " WHERE revoked=0") + " ORDER BY hostname, uuid"
        return [_agent(row) for row in self.db.execute(sql)]

    def target_rows(self) -> list[dict[str, Any]]:
        """What targeting needs of every live agent (not proxies), without the facts: at
        10,000 agents, decoding every agent's facts for each run cost more than the run."""
        sql = ("SELECT uuid, hostname, labels FROM agents WHERE revoked=0 AND COALESCE(kind, 'agent')='agent' "
               "ORDER BY hostname, uuid")
        return [{"uuid": r[0], "hostname": r[1], "labels": loads(r[2])} for r in self.db.execute(sql)]

    def target_row(self, uuid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT uuid, hostname, labels FROM agents WHERE uuid=?", (uuid,)).fetchone()
        return {"uuid": row[0], "hostname": row[1], "labels": loads(row[2])} if row else None


# SQLite's representations -> the records' Python types, keys kept in column order (the API's JSON)

def _token(row: sqlite3.Row) -> JoinTokenRecord:
    out = dict(row)
    out["revoked"] = bool(out["revoked"])
    out["proxy_names"] = loads(out.get("proxy_names") or "[]")
    return cast(JoinTokenRecord, out)


def _agent(row: sqlite3.Row) -> AgentRecord:
    out = dict(row)
    out["facts"] = loads(out["facts"])
    out["labels"] = loads(out["labels"])
    out["revoked"] = bool(out["revoked"])
    out["e2e_key"] = bytes.fromhex(out["e2e_key"] or "")
    return cast(AgentRecord, out)
