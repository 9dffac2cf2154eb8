"""The REST API the SDK and the CLI use. Every route requires the admin token."""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import time
from typing import Any, Literal, cast

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hcsdk.common.jointoken import JoinToken
from hcsdk.common.version import __version__
from hcsdk.net.asgi import Scope
from hcsdk.net.channel_server import bearer_token
from hcsdk.net.tls import ca_fingerprint, norm_name
from hcsdk.protocol import vocab
from hcsdk.protocol.e2e import b64, public_key
from hcsdk.protocol.errors import MessageError
from hcsdk.protocol.names import CLIENT_RUN_ID, is_sha256
from hcsdk.protocol.tasks import SessionKind
from hcsdk.protocol.wire import dumps

from .artifacts_api import artifact_routes
from .blobs import BlobStore
from .bootstrap import Paths, master_only_names, secret_hash
from .errors import RequestRejected
from .hub import Hub
from .proxy_stats import proxy_routes
from .releases import Releases
from .releases_api import release_routes
from .schedules_api import schedule_routes
from .store import AgentRecord, JoinTokenRecord
from .targets import resolve


class RunRequest(BaseModel):
    cmd: str = "shell"
    args: dict[str, Any]
    targets: dict[str, Any]
    timeout: float = Field(default=600.0, gt=0, le=7 * 86400)
    #: the client's name for this run: a request resent (to this master or another) with the
    #: same id gets the run the first one made, never a second run
    run_id: str | None = Field(default=None, pattern=CLIENT_RUN_ID)


class TokenRequest(BaseModel):
    ttl: float = Field(default=86400.0, gt=0, le=365 * 86400)
    description: str = ""
    #: where agents joining with this token connect (proxies); default: this master
    urls: list[str] = Field(default_factory=list, max_length=32)
    #: what it enrolls: the enrolling side cannot choose
    kind: SessionKind = SessionKind.AGENT
    #: a proxy token: the only hosts the master will sign into that proxy's certificate
    proxy_names: list[str] = Field(default_factory=list, max_length=32)
    #: enrollments it allows (0: any number until it expires)
    uses: int = Field(default=0, ge=0, le=1_000_000)


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: matched whole (fullmatch, \Z): "$" would also take a trailing newline into a certificate's names
_HOST_RE = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\.?")


def _proxy_names(req: TokenRequest, master_names: set[str]) -> list[str]:
    """The hosts a proxy token lets its proxy's certificate name: plain host names or IP
    addresses (no wildcards), none of them the master's own."""
    if req.kind == SessionKind.AGENT:
        if req.proxy_names:
            raise RequestRejected("proxy_names are for a proxy token (kind 'proxy'); an agent gets no certificate")
        return []
    if not req.proxy_names:
        raise RequestRejected("a proxy token names the hosts its proxy serves (proxy_names, "
                              "`zy token create --kind proxy --proxy-name HOST`)")
    names = []
    for name in req.proxy_names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if not _HOST_RE.fullmatch(name):
                raise RequestRejected(f"proxy name {name!r} is not a host name or IP address (no wildcards)") from None
        if norm_name(name) in master_names:
            raise RequestRejected(f"proxy name {name!r} is one of this master's own names: a proxy's certificate "
                                  "must never be valid for the master")
        names.append(name)
    return list(dict.fromkeys(names))


class AuthFailed(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message


def _problem(status: int, message: str, kind: str) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message, "kind": kind}, status_code=status, headers=headers)


def _validate_args(cmd: str, args: dict[str, Any]) -> None:
    """The early check of a built-in command's arguments (the agent checks them fully)."""
    try:
        vocab.check_request_args(cmd, args)
    except MessageError as exc:
        raise RequestRejected(exc.reason) from None


def build_api(hub: Hub, paths: Paths, master_urls: list[str], e2e_private: bytes) -> FastAPI:
    app = FastAPI(title="zy master", version=__version__, docs_url=None, redoc_url=None)
    store = hub.db.store
    blobs = BlobStore(paths.root / "blobs", hub)  # an update's build: here, or in a shared store

    async def admin(request: Request) -> None:
        token = bearer_token(cast(Scope, request.scope))  # the ASGI scope the app was called with
        if token is None:
            raise AuthFailed(401, "API token missing (send 'Authorization: Bearer <token>')")
        expected = await hub.db(store.get_meta, "admin_token_hash") or ""
        if not hmac.compare_digest(expected, secret_hash(token)):
            raise AuthFailed(401, "API token is not valid")

    @app.exception_handler(AuthFailed)
    async def _auth_failed(request: Request, exc: AuthFailed) -> JSONResponse:
        return _problem(exc.status, exc.message, "auth")

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return _problem(exc.status, str(exc), exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, str(exc.detail), "request")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            ctx = next(e for e in errs if e.get("type") == "json_invalid").get("ctx") or {}
            return _problem(400, f"malformed JSON: {ctx.get('error', 'cannot parse the body')}", "request")
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errs[:5]]
        return _problem(422, "invalid request: " + "; ".join(parts), "request")

    deps = [Depends(admin)]
    app.include_router(schedule_routes(hub, admin))
    app.include_router(proxy_routes(hub, admin))
    app.include_router(artifact_routes(hub, paths, admin))
    releases = Releases(hub)
    hub.on_start.append(releases.start)
    app.include_router(release_routes(releases, admin))

    @app.get("/api/v1/status", dependencies=deps)
    async def status() -> dict[str, Any]:
        return {"version": __version__, "agents_online": len(hub.sessions), "urls": master_urls, **hub.stats}

    @app.get("/api/v1/inventory", dependencies=deps)
    async def inventory(targets: str | None = None) -> list[dict[str, Any]]:
        """Every agent, or those a target expression (glob, label selector, uuid) selects."""
        rows = [_inventory_row(a) for a in await hub.db(store.agents)]
        if targets:
            try:
                rows = resolve({"expr": targets}, rows)
            except ValueError as exc:
                raise RequestRejected(str(exc), kind="target", status=404) from None
        online = await hub.online_uuids([row["uuid"] for row in rows])  # on any master of the store
        for row in rows:
            session = hub.sessions.get(row["uuid"])
            row["online"] = row["uuid"] in online
            row["mode"] = session.mode if session else None
            row["via"] = [_name(hub, v) for v in session.via] if session else []
        return rows

    @app.post("/api/v1/runs", dependencies=deps)
    async def create_run(req: RunRequest) -> dict[str, Any]:
        _validate_args(req.cmd, req.args)
        if req.cmd == vocab.UPDATE and not (is_sha256(req.args.get("sha256"))
                                           and await blobs.size(str(req.args["sha256"])) is not None):
            raise RequestRejected(f"no build with SHA-256 {req.args.get('sha256')!r} was uploaded to this master "
                                  "(client.agents.update uploads it first)", status=404)
        if req.run_id is not None:
            return await hub.create_run_once(req.cmd, req.args, req.targets, req.timeout, req.run_id)
        return await hub.create_run(req.cmd, req.args, req.targets, req.timeout)

    @app.get("/api/v1/runs/{run_id}", dependencies=deps)
    async def get_run(run_id: str) -> dict[str, Any]:
        run = await hub.db(store.run, run_id)
        if run is None:
            raise RequestRejected(f"no run {run_id!r}", kind="run", status=404)
        return run

    @app.post("/api/v1/runs/{run_id}/cancel", dependencies=deps)
    async def cancel_run(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "cancelling": await hub.cancel_run(run_id)}

    @app.get("/api/v1/runs/{run_id}/events", dependencies=deps)
    async def run_events(run_id: str, after: int = 0, folded: bool = False) -> StreamingResponse:
        try:
            exists = await hub.db(store.run_exists, run_id)
        except Exception:  # the store is away (PostgreSQL restarting): the stream waits for it
            exists = True
        if not exists:
            raise RequestRejected(f"no run {run_id!r}", kind="run", status=404)
        return StreamingResponse(hub.events.stream(hub.db, run_id, after, folded), media_type="application/x-ndjson")

    @app.post("/api/v1/tokens", dependencies=deps)
    async def create_token(req: TokenRequest) -> dict[str, Any]:
        names = _proxy_names(req, master_only_names(paths))
        for url in req.urls:
            if not url.startswith("https://"):
                raise RequestRejected(f"token URLs must be https:// URLs, got {url!r}")
        token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(24)
        row = await hub.db(store.add_join_token, token_id, secret_hash(secret), req.ttl, req.description, req.kind,
                           names, req.uses)
        fingerprint = ca_fingerprint(paths.ca_cert.read_bytes())
        jt = JoinToken(urls=tuple(req.urls or await cluster_urls(hub, master_urls)), ca_fingerprint=fingerprint,
                       e2e_public=b64(public_key(e2e_private)), token_id=token_id, secret=secret,
                       proxy_ca_fingerprint=ca_fingerprint(paths.proxy_ca_cert.read_bytes()), kind=req.kind,
                       proxy_names=tuple(names))
        return {"id": token_id, "token": jt.encode(), "expires_at": row["expires_at"], "ca": fingerprint,
                "kind": req.kind, "proxy_names": names, "uses": req.uses}

    @app.get("/api/v1/tokens", dependencies=deps)
    async def list_tokens() -> list[dict[str, Any]]:
        now = time.time()
        return [_token_row(t, now) for t in await hub.db(store.join_tokens)]

    @app.delete("/api/v1/tokens/{token_id}", dependencies=deps)
    async def revoke_token(token_id: str) -> dict[str, Any]:
        if not await hub.db(store.revoke_join_token, token_id):
            raise RequestRejected(f"no join token {token_id!r}", kind="token", status=404)
        return {"id": token_id, "revoked": True}

    @app.post("/api/v1/agents/{uuid}/{action}", dependencies=deps)
    async def agent_action(uuid: str, action: Literal["revoke", "disconnect"]) -> dict[str, Any]:
        if await hub.db(store.agent, uuid) is None:
            raise RequestRejected(f"unknown agent {uuid!r}", kind="target", status=404)
        if action == "revoke":
            await hub.db(store.revoke_agent, uuid)
        session = hub.sessions.get(uuid)
        if session:
            session.close(f"{action} requested")
            hub.session_ended(session)
        return {"uuid": uuid, action: True}

    return app


# The REST API's JSON for the store's records, as it was when the store handed SQLite's rows
# through: flags as 0/1 (the SDK and tests read these bytes), no secrets.

def _inventory_row(agent: AgentRecord) -> dict[str, Any]:
    row: dict[str, Any] = {k: v for k, v in agent.items() if k not in ("credential_hash", "e2e_key")}
    row["revoked"] = int(agent["revoked"])
    return row


async def cluster_urls(hub: Hub, own: list[str]) -> list[str]:
    """Where an agent joining with a token may connect: this master's URLs first, then every
    other live master's (heartbeat within master_dead_after), so it fails over between them."""
    rows = await hub.db(hub.db.store.masters)
    dead_after, me = hub.settings.master_dead_after, hub.settings.master_id
    urls = list(own)
    for row in rows:
        # the store's own clock says how old a heartbeat is: masters' clocks may disagree
        if row["id"] != me and row["heartbeat_age"] <= dead_after:
            urls.extend(u for u in row["urls"] if u not in urls)
    return urls[:32]  # what a token request may name too; the first (this master) always fits


def _token_row(token: JoinTokenRecord, now: float) -> dict[str, Any]:
    used_up = token["max_uses"] and token["uses"] >= token["max_uses"]
    state = ("revoked" if token["revoked"] else "expired" if token["expires_at"] < now
             else "used" if used_up else "valid")
    return {**token, "revoked": int(token["revoked"]), "state": state}


def _name(hub: Hub, uuid: str) -> str:
    session = hub.sessions.get(uuid)
    return session.hostname if session and session.hostname else uuid


class BodyLimit:
    """Reads a request body up to a size before the framework sees it, so an oversized body is
    a 413 whether or not it announced its length."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _too_large(send, self.limit)
                return
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > self.limit:
                await _too_large(send, self.limit)
                return
            if not msg.get("more_body"):
                break
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await _reply(send, 400, f"request body is not valid UTF-8 (byte {exc.start}); "
                                    "JSON must be UTF-8: send text, or base64 for binary content")
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            after: dict[str, Any] = await receive()  # the disconnect, when the app reads on
            return after

        await self.app(scope, replay, send)


async def _too_large(send: Any, limit: int) -> None:
    await _reply(send, 413, f"request body exceeds {limit} bytes")


async def _reply(send: Any, status: int, message: str) -> None:
    body = dumps({"error": message, "kind": "request"})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
