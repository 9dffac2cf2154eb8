"""The agent-facing routes: CA, enrollment, handshake, and the channel itself.

Route policy (an allow-list: anything not named here is 404):

    GET  /v1/ca             public       the CA certificate (its hash is pinned in join tokens)
    POST /v1/enroll         join token   first contact; returns the agent's credential
    POST /v1/handshake      agent        facts in, session id out
    GET  /v1/channel/down   agent+sid    long-lived stream of framed messages to the agent
    POST /v1/channel/up     agent+sid    long-lived request body of framed messages from it
    POST /v1/channel/poll   agent+sid    HTTP/1.1 fallback: uplink batch in, downlink batch out
                                         (held up to poll_wait); ?mode=up: uplink only, at once
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from typing import Any, cast

import anyio

from hcsdk.net.asgi import Receive, Scope, Send, dispatch, error, header, query, respond
from hcsdk.net.channel_server import ChannelServer, Credential, Refusal, bearer
from hcsdk.net.limits import KeyedSlots, authenticated, declared_length, read_limited
from hcsdk.net.pacing import SHORT_RETRY, AdmissionPacer
from hcsdk.net.settings import ENROLL_BODY, HANDSHAKE_BODY
from hcsdk.net.tls import norm_name, sign_csr
from hcsdk.protocol.e2e import derive_key, unb64
from hcsdk.protocol.errors import ProtocolError
from hcsdk.protocol.messages import UP, Bye, Heartbeat, Message, Sample, Stats, parse
from hcsdk.protocol.tasks import ChannelMode, SessionKind
from hcsdk.protocol.wire import FrameError, loads

from . import proxy_stats
from .blobs import BlobStore
from .bootstrap import Paths, master_only_names, secret_hash
from .hub import Hub, Session
from .keyring import AgentKeys, Unsealable
from .schedule_spec import reported_problem
from .store import AgentRecord, Result, TokenUsedUp

log = logging.getLogger("zy.master.channel")

#: a handshake body is facts, labels and schedule digests: sent at once by an honest client
HANDSHAKE_BODY_TIMEOUT = 5.0


class ChannelApp:
    def __init__(self, hub: Hub, paths: Paths, e2e_private: bytes, blobs: BlobStore | None = None,
                 agent_keys: AgentKeys | None = None):
        self.hub = hub
        self.blobs = blobs
        self.paths = paths
        self.e2e_private = e2e_private
        #: agents' MAC keys as the store keeps them (sealed under the cluster key with --store)
        self.agent_keys = agent_keys or AgentKeys(None)
        self.settings = hub.settings
        self._handshake_slots = anyio.CapacityLimiter(self.settings.handshake_concurrency)
        self._handshakes_waiting = 0
        #: tells each handshake refused for a full queue its own time to come back
        self.pacer = AdmissionPacer()
        #: one handshake in flight per uuid: a second one at the same time is refused at once,
        #: so one credential cannot fill the admission slots or the queue
        self._handshaking = KeyedSlots(1)
        #: concurrent blob downloads per credential: an agent fetches 4 release chunks at a time,
        #: a proxy fetches for everyone behind it
        self._downloads = KeyedSlots(self.settings.downloads_per_credential)
        self._proxy_downloads = KeyedSlots(8 * self.settings.downloads_per_credential)
        self._all_downloads = KeyedSlots(self.settings.downloads_total)
        self.sessions = HubSessions(hub)
        # a poll batch may be megabytes from a thin link: the deadline allows 64 KiB/s for the
        # largest, beyond the base one (the sender has authenticated; this only ends stalls)
        poll_timeout = self.settings.body_timeout + self.settings.max_body / (64 * 1024)
        self.channel = ChannelServer(self.sessions, self.settings, self.settings.max_body, poll_timeout)
        self.routes = {
            ("GET", "/v1/ca"): self.ca,
            ("POST", "/v1/enroll"): self.enroll,
            ("POST", "/v1/handshake"): self.handshake,
            **self.channel.routes,
            ("GET", "/v1/blob"): self.blob,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # a body announced over the route's cap is refused before anything else happens
        cap = {"/v1/enroll": ENROLL_BODY, "/v1/handshake": HANDSHAKE_BODY}.get(scope["path"], self.settings.max_body)
        if (declared_length(scope) or 0) > cap and scope["path"] != "/v1/channel/up":
            await error(send, 413, f"request body exceeds {cap} bytes")
            return
        if scope["path"] == "/v1/enroll" and await self._forwarding_proxy(scope):
            authenticated(scope)  # a proxy relaying its agents' enrollments: not one address's flood
        await dispatch(self.routes, scope, receive, send)

    async def _forwarding_proxy(self, scope: Scope) -> bool:
        """Whether a request carries a valid proxy credential (a proxy forwards enrollments on
        its own channel, with its credential; a swarm of new agents behind it all enroll
        through it)."""
        row = await self.sessions.check(bearer(scope))
        return not isinstance(row, Refusal) and row.get("kind") == SessionKind.PROXY

    # -- public ------------------------------------------------------------------------------
    async def ca(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, self.paths.ca_cert.read_bytes())

    async def enroll(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._json(receive, send)
        if body is None:
            return
        token, uuid = body.get("token"), body.get("uuid")
        facts, labels = body.get("facts") or {}, body.get("labels") or {}
        kind = body.get("kind", SessionKind.AGENT)
        try:
            peer = unb64(str(body.get("e2e_pub", "")))
            e2e_key = derive_key(self.e2e_private, peer, str(uuid))
        except ValueError:
            await error(send, 400, "enroll needs 'e2e_pub', the agent's X25519 public key (base64url)")
            return
        if kind not in tuple(SessionKind):
            await error(send, 400, "'kind' must be 'agent' or 'proxy'")
            return
        if not isinstance(token, str) or not isinstance(uuid, str) or not (8 <= len(uuid) <= 64):
            await error(send, 400, "enroll needs 'token' and 'uuid' strings")
            return
        if not isinstance(facts, dict) or not _str_map(labels):
            await error(send, 400, "'facts' must be an object and 'labels' a map of strings")
            return
        token_id, _, secret = token.partition(".")
        row = await self.hub.join_token(token_id)
        if row is None or not hmac.compare_digest(row["secret_hash"], secret_hash(secret)):
            await error(send, 401, "join token is not valid", kind="auth")
            return
        if row["revoked"] or row["expires_at"] < time.time():
            await error(send, 403, "join token has expired or was revoked; create a new one", kind="auth")
            return
        # The admin chose what this token enrolls; the enrolling side does not get to pick.
        if kind != row["kind"]:
            theirs, asked = (f"{'an' if k == SessionKind.AGENT else 'a'} {k}" for k in (row["kind"], kind))
            await error(send, 403, f"this join token is {theirs} token; it cannot enroll {asked} "
                        f"(create one with `zy token create --kind {kind}`)", kind="auth")
            return
        existing = await self.hub.agent(uuid)
        # Re-enrolling is for an agent that crashed before saving its credential; once an agent
        # has connected, its uuid belongs to it and a token holder cannot take it over.
        if existing and (existing["revoked"] or existing["token_id"] != token_id or existing["connects"] > 0):
            await error(send, 403, f"agent {uuid} is already enrolled; it cannot enroll again", kind="auth")
            return
        # a re-enrollment of the same uuid is not another use (the store says the same, atomically)
        if not existing and row["max_uses"] and row["uses"] >= row["max_uses"]:
            await error(send, 403, f"join token has been used up ({row['uses']} of {row['max_uses']} "
                        "enrollments); create a new one", kind="auth")
            return
        answer: dict[str, Any] = {"uuid": uuid, "proxy_ca": self.paths.proxy_ca_cert.read_text()}
        if kind == SessionKind.PROXY:  # it serves agents over TLS: the proxy CA (never the master's) vouches for it
            allowed = [n for n in row["proxy_names"] if norm_name(n) not in master_only_names(self.paths)]
            try:
                answer["cert"] = sign_csr(self.paths.proxy_ca_cert.read_bytes(), self.paths.proxy_ca_key.read_bytes(),
                                          str(body.get("csr", "")).encode(), allowed=allowed).decode()
            except ValueError as exc:
                await error(send, 400, f"a proxy enrolls with a valid 'csr' for its token's names: {exc}")
                return
        credential = secrets.token_urlsafe(32)
        try:
            same = await self.hub.enroll(uuid, secret_hash(credential), token_id, facts, labels,
                                         self.agent_keys.to_store(uuid, e2e_key), kind)
        except TokenUsedUp:
            await error(send, 403, "join token has been used up; create a new one", kind="auth")
            return
        warnings = [f"hostname {facts.get('hostname')!r} is already used by {len(same)} other enrolled {kind}(s) "
                    f"({', '.join(u[:8] for u in same)}); give each a --hostname of its own to tell them apart"
                    ] if same else []
        for text in warnings:
            log.warning("enrolled %s %s: %s", kind, uuid, text)
        await respond(send, 200, {**answer, "credential": credential, "warnings": warnings})

    # -- agent -------------------------------------------------------------------------------
    async def _agent(self, scope: Scope, send: Send) -> AgentRecord | None:
        """The enrolled agent or proxy whose credential the request carries, or None once the
        refusal is answered."""
        row = await self._credential(bearer(scope), send)
        if row is not None:
            authenticated(scope)  # from here on the request no longer counts against its address
        return row

    async def _credential(self, cred: Credential | None, send: Send) -> AgentRecord | None:
        row = await self.sessions.check(cred)
        if isinstance(row, Refusal):
            await row.send(send)
            return None
        return row

    async def blob(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A file an agent was told to fetch (by its hash, in a signed command); any enrolled
        agent or proxy may fetch one."""
        if self.blobs is None:
            await error(send, 404, "this master serves no files")
            return
        row = await self._agent(scope, send)
        if row is None:
            return
        slots = self._proxy_downloads if row.get("kind") == SessionKind.PROXY else self._downloads
        with self._all_downloads.take("") as room, slots.take(row["uuid"]) as mine:
            if not room:
                self.hub.stats["busy"] += 1
                await error(send, 429, f"the master has {self._all_downloads.limit} downloads in flight; "
                                       "retry after a backoff", kind="busy")
                return
            if not mine:
                self.hub.stats["busy"] += 1
                who = row.get("kind") or SessionKind.AGENT
                await error(send, 429, f"{who} {row['uuid']} already has {slots.limit} downloads in flight; "
                                       "retry when one ends", kind="busy")
                return
            await self.blobs.download(scope, receive, send, row)

    async def handshake(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Admission first: a reconnect storm (a master restart under 10,000 agents) must not
        queue without bound. Beyond the queue the answer is 503 at once, with the time this
        agent should come back (``retry_after``, ``Retry-After``: a slot of its own, spaced by
        the measured admission rate), which spreads the storm over the time we need for it.

        The credential is checked from the headers, and the body read (bounded, with a
        deadline) before a processing slot is taken: a slot is held only for work, never while
        a client trickles its body in, and each uuid has one handshake in flight at most."""
        if self._busy():  # shed a storm before even the credential lookup
            await self._refuse_busy(send)
            return
        who = await self._handshake_auth(scope, send)
        if who is None:
            return
        with self._handshaking.take(who[0]["uuid"]) as mine:
            if not mine:
                self.hub.stats["busy"] += 1
                await error(send, 409, f"a handshake for agent {who[0]['uuid']} is already in progress; "
                                       "retry after a backoff", kind="busy", retry_after=SHORT_RETRY)
                return
            # The body is read before the handshake joins the admission queue: clients that
            # trickle their bodies (many enrolled uuids from one token) must not fill the queue
            # that honest reconnects wait in. Each read is bounded and has a short deadline.
            body = await self._json(receive, send, HANDSHAKE_BODY, scope, HANDSHAKE_BODY_TIMEOUT)
            if body is None:
                return
            if self._busy():
                await self._refuse_busy(send)
                return
            self._handshakes_waiting += 1
            try:
                async with self._handshake_slots:
                    try:
                        await self._handshake(scope, send, *who, body)
                    finally:
                        self.pacer.completed()  # the admission rate the pacer spaces refusals by
            finally:
                self._handshakes_waiting -= 1

    def _busy(self) -> bool:
        return self._handshakes_waiting >= self.settings.handshake_queue

    async def _refuse_busy(self, send: Send) -> None:
        """503 with the time this client should come back: a slot of its own, after the queue
        ahead (see hcsdk.net.pacing.AdmissionPacer), so a storm returns at the rate we admit."""
        self.hub.stats["busy"] += 1
        wait = self.pacer.retry_after(self._handshakes_waiting)
        await error(send, 503, f"the master is busy with reconnecting agents; retry in {wait:.1f} s",
                    kind="busy", retry_after=wait)

    async def _handshake_auth(self, scope: Scope,
                              send: Send) -> tuple[AgentRecord, Session | None, list[str]] | None:
        """Who is handshaking: the client's row, the proxy session carrying it (or None), the
        proxies on its path. From the headers alone.

        A proxy forwards a handshake with its own credential in Authorization, its session id
        in ``x-zy-sid``, the client's credential in ``x-zy-agent-auth`` and the proxies on the
        path in ``x-zy-via``; the client is then reached through that proxy's session."""
        row = await self._agent(scope, send)
        if row is None:
            return None
        carrier: Session | None = None
        via: list[str] = []
        relayed = header(scope, b"x-zy-agent-auth")
        if relayed is not None:
            carrier = self.hub.sessions.get(row["uuid"])
            if (carrier is None or carrier.carrier is not None or carrier.kind != SessionKind.PROXY
                    or carrier.sid != header(scope, b"x-zy-sid")):
                await error(send, 409, "forwarding proxy has no live session here; handshake again", kind="session")
                return None
            row = await self._credential(Credential(relayed), send)
            if row is None:
                return None
            via = [v for v in (header(scope, b"x-zy-via") or "").split(",") if v]
        return row, carrier, via

    async def _handshake(self, scope: Scope, send: Send, row: AgentRecord, carrier: Session | None,
                         via: list[str], body: dict[str, Any]) -> None:
        facts, labels = body.get("facts") or {}, body.get("labels") or {}
        if not isinstance(facts, dict) or not _str_map(labels):
            await error(send, 400, "'facts' must be an object and 'labels' a map of strings")
            return
        schedules = body.get("schedules")
        if schedules is not None and (why := reported_problem(schedules)):
            await error(send, 400, why, kind="schedules")
            return
        direct = ChannelMode.H2 if scope.get("http_version") == "2" else ChannelMode.POLL
        mode = carrier.mode if carrier else direct
        handover = body.get("handover")
        try:
            mac_key = self.agent_keys.from_store(row["uuid"], row["e2e_key"])
        except Unsealable as exc:  # changed in the store: no session on a key we cannot trust
            log.warning("refused handshake of %s: its stored key %s", row["uuid"], exc)
            await error(send, 403, "this credential's stored key does not open on this master", kind="auth")
            return
        session = await self.hub.handshake(row["uuid"], facts, labels, mode, mac_key,
                                           kind=row.get("kind") or SessionKind.AGENT, carrier=carrier, via=via,
                                           handover=handover if isinstance(handover, str) else None,
                                           schedules=schedules if _str_map(schedules) else None)
        await respond(send, 200, {"uuid": session.uuid, "sid": session.sid, "mode": mode, **self.settings.served(),
                                  "dead_after": self.settings.dead_after, "fold": True})

    async def _json(self, receive: Receive, send: Send, limit: int = ENROLL_BODY,
                    scope: Scope | None = None, timeout: float | None = None) -> dict[str, Any] | None:
        """A JSON object body of at most ``limit`` bytes (by default the enrollment's), within
        the body deadline; 413/408 beyond (see hcsdk.net.asgi.dispatch)."""
        deadline = min(timeout or self.settings.body_timeout, self.settings.body_timeout)
        raw = await read_limited(receive, limit, deadline, scope)
        try:
            body = loads(raw)
        except ValueError as exc:
            await error(send, 400, f"malformed JSON: {exc}")
            return None
        if not isinstance(body, dict):
            await error(send, 400, "request body must be a JSON object")
            return None
        return body


class HubSessions:
    """The master's session table for the channel routes (hcsdk.net.channel_server.SessionTable):
    credentials are checked against the store, sessions are the hub's, and what comes up is
    checked (shape, route, end-to-end MAC) and ingested."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def check(self, cred: Credential | None) -> AgentRecord | Refusal:
        """The enrolled agent's (or proxy's) row for ``cred``, or why not."""
        if cred is None or not cred.complete:
            return Refusal(401, "agent credential missing")
        row = await self.hub.agent(cred.uuid)
        if row is None or not hmac.compare_digest(row["credential_hash"], secret_hash(cred.secret)):
            return Refusal(401, "agent credential is not valid")
        if row["revoked"]:
            return Refusal(403, f"agent {cred.uuid} has been revoked")
        return row

    async def attach(self, scope: Scope, credential: Credential | None) -> Session | Refusal:
        row = await self.check(credential)
        if isinstance(row, Refusal):
            return row
        authenticated(scope)  # from here on the request no longer counts against its address
        sid = query(scope).get("sid")
        session = self.hub.sessions.get(row["uuid"])
        if session is None or session.sid != sid:
            session = self.hub.retiring.get(row["uuid"])  # handing over to its new build: still reports
        if (session is None or session.carrier is not None or session.sid != sid
                or session.closed.is_set()):
            return Refusal(409, "session is gone or superseded; handshake again", "session")
        return session

    def heartbeat(self, session: Session) -> float:
        return self.hub.settings.downlink_beat(session.mode)

    def ended(self, session: Session) -> None:
        self.hub.session_ended(session)

    def drop(self, session: Session, exc: FrameError) -> None:
        log.warning("dropping agent %s: %s", session.uuid, exc)
        session.close(f"bad frame: {exc}")
        self.hub.session_ended(session)

    async def deliver(self, session: Session, msgs: list[dict[str, Any]]) -> None:
        """Each envelope is parsed once (the checks of hcsdk.protocol.messages) and handled by its
        class: shape, then route, then MAC, then (for a sample) the series' owner. A malformed
        envelope, or one the core cannot check, drops this session only (FrameError)."""
        self.hub.touch(session)
        for d in msgs:
            try:
                msg = parse(d, UP)
            except ProtocolError as exc:
                raise FrameError(f"malformed {d['t']!r} message: {exc}") from None
            # by class identity (the message classes have no subclasses): the cheapest branch,
            # and this loop is the fan-out's hot path
            cls = type(msg)
            if cls is Heartbeat:
                continue
            uuid = msg.uuid
            if cls is Stats:  # a proxy's cache counters (its own, or a proxy's behind it): memory only
                sender = self.hub.carried(session, uuid)
                if sender is not None and sender.kind == SessionKind.PROXY and self._authentic(msg):
                    proxy_stats.of(self.hub).record(uuid, cast(Stats, msg).cache)
                continue
            target = self.hub.carried(session, uuid)
            if cls is Bye:  # a proxy says a client behind it went away
                if target is not None and target is not session:
                    self.hub.session_ended(target, reason="it left its proxy")
                continue
            if target is None:
                self.hub.stats["rejected"] += 1
                log.warning("dropped a %r message for %s from %s, which does not carry it", msg.T, uuid, session.uuid)
                continue
            try:  # (inline, not self._authentic: one call less per message)
                authentic = self.hub.authentic(msg)
            except (ProtocolError, RecursionError) as exc:
                raise FrameError(f"malformed {msg.T!r} message: {type(exc).__name__}: {exc}") from None
            if not authentic:
                # altered, forged, or signed with another agent's key: never stored, never acked
                self.hub.stats["rejected"] += 1
                log.warning("rejected a %r message for task %r: bad MAC (altered or forged in transit?)",
                            msg.T, msg.taskid)
                continue
            self.hub.touch(target)
            if cls is Sample and not await self.hub.may_sample(uuid, cast(Sample, msg)):
                self.hub.refuse_sample(session, uuid, cast(Sample, msg))
                continue
            await self.hub.ingest(uuid, cast(Result, msg))  # parse(UP) leaves start, out, done, sample

    def _authentic(self, msg: Message) -> bool:
        """The MAC check. What cannot be checked drops the session like a bad frame, never the
        request with a 500: a ProtocolError, or a payload nested too deep for the canonical JSON
        the MAC covers (RecursionError, should the core let one through)."""
        try:
            return self.hub.authentic(msg)
        except (ProtocolError, RecursionError) as exc:
            raise FrameError(f"malformed {msg.T!r} message: {type(exc).__name__}: {exc}") from None

def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
