"""PostgreSQL: join tokens and the enrolled agents and proxies (as sqlite_fleet.py)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

from hcsdk.protocol.wire import loads

from .errors import TokenUsedUp
from .postgres_base import Conn, PostgresBase, clean, js
from .protocol import AgentRecord, JoinTokenRecord

_TOKEN_LIST = ("SELECT id, created_at, expires_at, revoked, description, uses, kind, proxy_names, max_uses "
               "FROM join_tokens")


class PostgresFleetSQL(PostgresBase):
    # -- join tokens ------------------------------------------------------------------------
    def add_join_token(self, token_id: str, secret_hash: str, ttl: float, description: str, kind: str = "agent",
                       proxy_names: Iterable[str] = (), max_uses: int = 0) -> JoinTokenRecord:
        """``max_uses`` 0: any number of enrollments until it expires."""
        now = time.time()
        row = self.one(
            "INSERT INTO join_tokens(id, secret_hash, created_at, expires_at, description, kind, proxy_names, "
            "max_uses) VALUES(%s,%s,%s,%s,%s,%s,%s,%s) RETURNING *",
            (token_id, secret_hash, now, now + ttl, description, kind, js(list(proxy_names)), max_uses),
        )
        assert row is not None  # RETURNING gives the row inserted
        return _token(row)

    def join_token(self, token_id: str) -> JoinTokenRecord | None:
        row = self.one("SELECT * FROM join_tokens WHERE id=%s", (token_id,))
        return _token(row) if row else None

    def join_tokens(self) -> list[JoinTokenRecord]:
        return [_token(r) for r in self.all(f"{_TOKEN_LIST} ORDER BY created_at")]

    def revoke_join_token(self, token_id: str) -> bool:
        return self.write("UPDATE join_tokens SET revoked=true WHERE id=%s", (token_id,)) > 0

    @staticmethod
    def _claim_token(conn: Conn, token_id: str, uuid: str) -> None:
        """Count one use of the token, in the enrollment's transaction. The token's row is locked
        first, so enrollments through one token (from any master) take turns: of two racing for
        its last use exactly one gets it, and the same uuid enrolling twice at once (an agent that
        crashed before saving its credential) is counted once."""
        locked = conn.execute("SELECT max_uses, uses FROM join_tokens WHERE id=%s FOR UPDATE", (token_id,)).fetchone()
        if locked is None:
            raise TokenUsedUp(token_id)
        again = conn.execute("SELECT 1 FROM agents WHERE uuid=%s AND token_id=%s", (uuid, token_id)).fetchone()
        if again:
            return
        if locked["max_uses"] and locked["uses"] >= locked["max_uses"]:
            raise TokenUsedUp(token_id)
        conn.execute("UPDATE join_tokens SET uses=uses+1 WHERE id=%s", (token_id,))

    # -- agents -----------------------------------------------------------------------------
    def enroll(self, uuid: str, credential_hash: str, token_id: str, facts: dict[str, Any],
               labels: dict[str, str], e2e_key: bytes, kind: str = "agent") -> list[str]:
        """Returns the other enrolled (not revoked) clients of this kind reporting the same
        hostname, for a warning. Raises TokenUsedUp when the token has no use left."""
        hostname = clean(str(facts.get("hostname", "")))
        with self.transaction() as conn:
            self._claim_token(conn, token_id, uuid)
            conn.execute(
                "INSERT INTO agents(uuid, credential_hash, token_id, hostname, facts, labels, enrolled_at, e2e_key, "
                "kind) VALUES(%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT(uuid) DO UPDATE SET "
                "credential_hash=excluded.credential_hash, e2e_key=excluded.e2e_key",
                (uuid, credential_hash, token_id, hostname, js(facts), js(labels), time.time(), e2e_key, kind),
            )
            same = conn.execute("SELECT uuid FROM agents WHERE hostname=%s AND kind=%s AND uuid<>%s AND NOT revoked "
                                "LIMIT 5", (hostname, kind, uuid)).fetchall() if hostname else []
        return [r["uuid"] for r in same]

    def agent(self, uuid: str) -> AgentRecord | None:
        row = self.one("SELECT * FROM agents WHERE uuid=%s", (uuid,))
        return _agent(row) if row else None

    def agent_connected(self, uuid: str, facts: dict[str, Any], labels: dict[str, str]) -> None:
        self.write(
            "UPDATE agents SET hostname=%s, facts=%s, labels=%s, last_seen=%s, connects=connects+1 WHERE uuid=%s",
            (clean(str(facts.get("hostname", ""))), js(facts), js(labels), time.time(), uuid),
        )

    def touch_agents(self, seen: dict[str, float]) -> None:
        if not seen:
            return
        # one statement for every agent, in uuid order (two masters' touches cannot deadlock)
        uuids = sorted(seen)
        self.write("UPDATE agents a SET last_seen=v.t FROM unnest(%s::text[], %s::float8[]) AS v(u, t) "
                   "WHERE a.uuid=v.u", (uuids, [float(seen[u]) for u in uuids]))

    def revoke_agent(self, uuid: str) -> bool:
        return self.write("UPDATE agents SET revoked=true WHERE uuid=%s", (uuid,)) > 0

    def agents(self, include_revoked: bool = False) -> list[AgentRecord]:
        sql = "SELECT * FROM agents" + ("" if include_revoked else " WHERE NOT revoked") + " ORDER BY hostname, uuid"
        return [_agent(row) for row in self.all(sql)]

    def target_rows(self) -> list[dict[str, Any]]:
        """What targeting needs of every live agent (not proxies), without the facts."""
        sql = ("SELECT uuid, hostname, labels FROM agents WHERE NOT revoked AND COALESCE(kind, 'agent')='agent' "
               "ORDER BY hostname, uuid")
        return [{"uuid": r["uuid"], "hostname": r["hostname"], "labels": loads(r["labels"])} for r in self.all(sql)]

    def target_row(self, uuid: str) -> dict[str, Any] | None:
        row = self.one("SELECT uuid, hostname, labels FROM agents WHERE uuid=%s", (uuid,))
        return {"uuid": row["uuid"], "hostname": row["hostname"], "labels": loads(row["labels"])} if row else None


# PostgreSQL's rows -> the records' Python types, keys kept in column order (the API's JSON)

def _token(row: dict[str, Any]) -> JoinTokenRecord:
    row["proxy_names"] = loads(row.get("proxy_names") or "[]")
    return cast(JoinTokenRecord, row)


def _agent(row: dict[str, Any]) -> AgentRecord:
    row["facts"] = loads(row["facts"])
    row["labels"] = loads(row["labels"])
    row["e2e_key"] = bytes(row["e2e_key"])
    return cast(AgentRecord, row)
