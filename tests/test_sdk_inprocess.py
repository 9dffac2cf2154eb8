"""The SDK in-process: ``httpx.MockTransport`` stands in for the master (``transport=``), so
runs, streams, resumes, errors and the derived sync faces are checked with no process and no
socket. The SDK itself is the real one; only the network is replaced. The answers mirror
master/api.py's: a run's targets, then NDJSON event lines ending with ``{"kind": "end"}``."""

from __future__ import annotations

import inspect
import json
import pydoc
import re
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from hcsdk import (
    AsyncClient,
    AsyncRelease,
    AsyncRun,
    AuthError,
    Client,
    ConfigError,
    MasterUnreachable,
    Release,
    RequestError,
    Run,
    TargetError,
    UsageError,
    ZyError,
)

URL = "https://master.test"
TARGETS = [{"taskid": "t1", "uuid": "u-1", "hostname": "web-1"}, {"taskid": "t2", "uuid": "u-2", "hostname": "web-2"}]
EVENTS: list[dict[str, Any]] = [
    {"id": 1, "taskid": "t1", "kind": "start", "seq": 0, "data": {"started_at": 100.0}},
    {"id": 2, "taskid": "t1", "kind": "out", "seq": 2, "data": {"stream": "stdout", "data": "world\n"}},
    {"id": 3, "taskid": "t1", "kind": "out", "seq": 1, "data": {"stream": "stdout", "data": "hello "}},
    {"id": 4, "taskid": "t2", "kind": "out", "seq": 1, "data": {"stream": "stderr", "data": "boom\n"}},
    {"id": 5, "taskid": "t1", "kind": "done", "seq": 3,
     "data": {"status": "ok", "exit_code": 0, "started_at": 100.0, "finished_at": 101.5}},
    {"id": 6, "taskid": "t2", "kind": "done", "seq": 2,
     "data": {"status": "failed", "exit_code": 3, "finished_at": 102.0, "error": "exit status 3"}},
]


class FakeMaster:
    """Answers the SDK's requests from tables; records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.events = list(EVENTS)
        #: streams to answer, in turn: each a number of events to send before the stream ends
        #: (None: all, then "end"), or an exception to raise instead of answering
        self.streams: list[int | None | Exception] = [None]
        self.routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = {
            ("POST", "/api/v1/runs"): self._create_run,
            ("GET", "/api/v1/runs/r1/events"): self._events,
            ("POST", "/api/v1/runs/r1/cancel"): lambda _: httpx.Response(200, json={"cancelling": 1}),
            ("GET", "/api/v1/status"): lambda _: httpx.Response(200, json={"agents_online": 2}),
        }

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != "Bearer T":
            return httpx.Response(401, json={"error": "API token is not valid", "kind": "auth"})
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json={"error": f"no route {request.url.path}", "kind": "request"})
        return route(request)

    def _create_run(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body["targets"] == {"expr": "nowhere-*"}:
            return httpx.Response(404, json={"error": "no agent matches 'nowhere-*'", "kind": "target"})
        if body["cmd"] == "frob":
            return httpx.Response(400, json={"error": "'frob' is not a cmd word", "kind": "request"})
        return httpx.Response(200, json={"run_id": "r1", "cmd": body["cmd"], "targets": TARGETS})

    def _events(self, request: httpx.Request) -> httpx.Response:
        plan = self.streams.pop(0) if self.streams else None
        if isinstance(plan, Exception):
            raise plan
        after = int(request.url.params.get("after", 0))
        rest = [e for e in self.events if e["id"] > after]
        lines = [json.dumps(e) for e in (rest if plan is None else rest[:plan])]
        if plan is None:
            lines.append(json.dumps({"kind": "end", "id": self.events[-1]["id"]}))
        return httpx.Response(200, content=("\n".join(lines) + "\n").encode(),
                              headers={"content-type": "application/x-ndjson"})

    def afters(self) -> list[str | None]:
        return [r.url.params.get("after") for r in self.requests if r.url.path.endswith("/events")]


@pytest.fixture
def master() -> FakeMaster:
    return FakeMaster()


def _async_client(master: FakeMaster, token: str = "T") -> AsyncClient:
    return AsyncClient(URL, token=token, transport=master.transport())


def test_sync_run_collects_every_target(master: FakeMaster) -> None:
    with Client(URL, token="T", transport=master.transport()) as client:
        run = client.run("echo hello world", targets="web-*", timeout=30)
        assert isinstance(run, Run) and run.total == 2 and not run.done
        df = run.to_dataframe()
    assert run.done and run.counts() == {"ok": 1, "failed": 1}
    by_host = df.set_index("hostname")
    assert by_host.loc["web-1", "stdout"] == "hello world\n"  # chunks in seq order, not arrival order
    assert by_host.loc["web-1", "duration_s"] == pytest.approx(1.5)
    assert by_host.loc["web-2", "stderr"] == "boom\n" and by_host.loc["web-2", "exit_code"] == 3
    assert by_host.loc["web-2", "error"] == "exit status 3"
    sent = json.loads(master.requests[0].content)
    assert re.fullmatch(r"r[0-9a-f]{16}", sent.pop("run_id"))  # named by the SDK: safe to resend
    assert sent == {"cmd": "shell", "args": {"script": "echo hello world"}, "targets": {"expr": "web-*"},
                    "timeout": 30}
    assert [(o.hostname, o.status) for o in run.outcomes()] == [("web-1", "ok"), ("web-2", "failed")]


def test_sync_events_stream_and_wait_returns_the_same_run(master: FakeMaster) -> None:
    client = Client(URL, token="T", transport=master.transport())
    run = client.run(["echo", "hi"], targets=["u-1", "u-2"])
    kinds = [(e.kind, e.hostname) for e in run.events()]
    assert kinds == [("start", "web-1"), ("stdout", "web-1"), ("stdout", "web-1"), ("stderr", "web-2"),
                     ("done", "web-1"), ("done", "web-2")]
    assert run.wait() is run
    assert json.loads(master.requests[0].content)["args"] == {"argv": ["echo", "hi"]}
    client.close()


def test_async_stream_resumes_from_its_cursor(master: FakeMaster) -> None:
    # the stream ends after two events, then the connection fails once: the run carries on
    # from the last event it saw, and no event comes twice
    master.streams = [2, httpx.ConnectError("connection refused"), None]

    async def main() -> list[int]:
        async with _async_client(master) as client:
            run = await client.run("true", targets="web-*")
            assert isinstance(run, AsyncRun)
            return [e.seq async for e in run.events()]

    seqs = anyio.run(main)
    assert len(seqs) == len(EVENTS)
    assert master.afters() == ["0", "2", "2"]


def test_errors_land_in_their_classes(master: FakeMaster) -> None:
    async def main() -> None:
        async with _async_client(master) as client:
            with pytest.raises(TargetError, match="no agent matches"):
                await client.run("true", targets="nowhere-*")
            with pytest.raises(RequestError, match="is not a cmd word") as refused:
                await client.run(cmd="frob", targets="web-*")
            assert refused.value.status == 400
            # local mistakes: refused before anything is sent
            before = len(master.requests)
            with pytest.raises(UsageError, match="takes an argv list"):
                await client.run("echo hi", cmd="exec", targets="web-*")
            with pytest.raises(ValueError, match="not valid UTF-8"):  # a UsageError is a ValueError too
                await client.run(b"\xff", targets="web-*")
            with pytest.raises(TargetError, match="no targets given"):
                await client.run("true", targets=None)
            with pytest.raises(UsageError, match="must be an absolute path"):
                await client.release("app.tgz", "web-*", dest="opt/app")
            with pytest.raises(UsageError, match="under a second"):
                await client.schedule("facts", "0.5s", targets="web-*")
            assert len(master.requests) == before
        async with _async_client(master, token="wrong") as bad:
            with pytest.raises(AuthError, match="401"):
                await bad.status()

    anyio.run(main)
    with pytest.raises(ConfigError, match="a token is needed"):
        AsyncClient(URL, token="", transport=master.transport())
    assert not issubclass(UsageError, RequestError) and issubclass(UsageError, ZyError)


def test_an_unreachable_master_is_master_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with Client(URL, token="T", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(MasterUnreachable, match="cannot reach the master at https://master.test"):
            client.status()


def test_no_agents_to_update_is_a_target_error(master: FakeMaster) -> None:
    master.routes[("GET", "/api/v1/inventory")] = lambda _: httpx.Response(200, json=[])
    with Client(URL, token="T", transport=master.transport()) as client:
        with pytest.raises(TargetError, match="no agents match"):
            client.agents.update("web-*", build="dist/zy-agent")


def test_release_returns_its_sync_face(master: FakeMaster) -> None:
    info = {"id": "rel1", "name": "app.tgz", "dest": "/opt/app.tgz", "state": "running", "shard": 0, "shards": 2,
            "message": "", "targets": [{"status": "ok"}, {"status": "pending"}]}
    master.routes[("POST", "/api/v1/releases")] = lambda _: httpx.Response(200, json=info)
    master.routes[("GET", "/api/v1/releases/rel1")] = lambda _: httpx.Response(200, json={**info, "state": "done"})
    master.routes[("POST", "/api/v1/releases/rel1/pause")] = lambda _: httpx.Response(
        200, json={**info, "state": "paused"})
    with Client(URL, token="T", transport=master.transport()) as client:
        rel = client.release("app.tgz", "web-*", dest="/opt/app.tgz", batch="50%", pause_between="1m")
        assert isinstance(rel, Release) and rel.id == "rel1" and rel.state == "running"
        assert repr(rel) == "<Release rel1 app.tgz -> /opt/app.tgz: running, shard 1/2, 1/2 ok>"
        assert rel.pause() is rel and rel.state == "paused"
        assert rel.wait(timeout=5) is rel and rel.state == "done"
        again = client.get_release("rel1")
        assert isinstance(again, Release) and again.info["state"] == "done"
    body = json.loads(master.requests[0].content)
    assert body["batch"] == "50%" and body["pause_between"] == 60.0 and body["dest"] == "/opt/app.tgz"


def test_sync_faces_show_the_async_parameters_and_docs() -> None:
    """help() and IDEs see what the async method declares: derived, not written twice."""
    pairs: list[tuple[Callable[..., Any], Callable[..., Any]]] = [
        (Client.release, AsyncClient.release), (Client.run, AsyncClient.run), (Release.wait, AsyncRelease.wait),
        (Run.events, AsyncRun.events), (Client.status, AsyncClient.status)]
    for sync, asynchronous in pairs:
        assert list(inspect.signature(sync).parameters) == list(inspect.signature(asynchronous).parameters)
        assert sync.__doc__ == asynchronous.__doc__
    assert inspect.signature(Client.release).return_annotation == "Release"
    assert inspect.signature(Client.run).return_annotation == "Run"
    assert inspect.signature(Run.events).return_annotation == "Iterator[Event]"
    assert inspect.signature(Release.wait).return_annotation == "Release"
    assert inspect.signature(AsyncRelease.wait).return_annotation == "AsyncRelease"
    assert Client.release.__qualname__ == "Client.release" and Client.close.__name__ == "close"
    assert "dest" in inspect.signature(Client.release).parameters
    # what help(hcsdk.Client.run) prints: the parameters, not (*args, **kwargs)
    shown = pydoc.render_doc(Client.run, renderer=pydoc.TextDoc())
    assert "targets: 'TargetsLike'" in shown and "timeout: 'float' = 600" in shown and "-> 'Run'" in shown
    # the async methods stay untouched by the derivation
    assert AsyncClient.release.__qualname__ == "AsyncClient.release"
    assert inspect.signature(AsyncClient.release).return_annotation == "AsyncRelease"


def _faces() -> list[tuple[type, type]]:
    """Each public Async* class of hcsdk with its sync face (the same name without "Async")."""
    import hcsdk

    return [(getattr(hcsdk, name), getattr(hcsdk, name.removeprefix("Async")))
            for name in hcsdk.__all__ if name.startswith("Async")]


def test_every_public_async_method_has_its_sync_counterpart() -> None:
    """A method added to an Async* class without its line on the sync face fails here: each
    public method (coroutine, async iterator or plain) is offered, derived from that very method."""
    faces = _faces()
    assert {a.__name__ for a, _ in faces} >= {"AsyncClient", "AsyncRun", "AsyncRelease", "AsyncSchedule",
                                              "AsyncPlugins", "AsyncAgents", "AsyncArtifacts"}
    missing = []
    for asynchronous, sync in faces:
        for name, member in vars(asynchronous).items():
            if name.startswith("_"):
                continue
            sync_name = "close" if name == "aclose" else name  # close() is the sync word for it
            counterpart = inspect.getattr_static(sync, sync_name, None)
            if isinstance(member, property):
                ok = isinstance(counterpart, property)
            else:  # derived by hcsdk._sync: functools.wraps keeps the async method as __wrapped__
                ok = getattr(counterpart, "__wrapped__", None) is member
            if not ok:
                missing.append(f"{sync.__name__}.{sync_name} (for {asynchronous.__name__}.{name})")
    assert missing == []


def test_plugins_list_reads_each_targets_outcome(master: FakeMaster) -> None:
    plugins = [{"plugin": "hello", "version": "1", "source": "installed", "sha256": "ab", "cmds": ["hello.hi"]}]
    master.events = [
        {"id": 1, "taskid": "t1", "kind": "done", "seq": 1, "data": {"status": "ok", "result": {"plugins": plugins}}},
        {"id": 2, "taskid": "t2", "kind": "done", "seq": 1, "data": {"status": "offline", "error": "agent offline"}},
    ]
    with Client(URL, token="T", transport=master.transport()) as client:
        df = client.plugins.list("web-*")
    table = df[["hostname", "status", "plugin", "error"]].astype(object)
    assert table.where(table.notna(), None).to_dict("records") == [
        {"hostname": "web-1", "status": "ok", "plugin": "hello", "error": None},
        {"hostname": "web-2", "status": "offline", "plugin": None, "error": "agent offline"},
    ]
    assert json.loads(master.requests[0].content)["cmd"] == "zy.plugins"


def test_no_sdk_module_reaches_into_another_objects_underscore_members() -> None:
    """The SDK's modules, zy and kernel_ext use each other through public names and the
    MasterLink seam: ``x._member`` is allowed on self/cls only (``_repr_mimebundle_``-style
    protocol names, which end in "_", are public)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    files = [*root.glob("hcsdk/_*.py"), *root.glob("hcsdk/cli*.py"), root / "hcsdk/localfleet.py",
             root / "hcsdk/__init__.py", *root.glob("kernel_ext/*.py")]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("_")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
