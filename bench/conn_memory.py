"""Connection memory: the server's RSS per held, idle HTTP/2 connection, granian's part and hcsdk's.

Issue 16: the master holds ~63 KiB per idle connected agent (goal <= 40 KiB). To see how much of
that is granian's (Rust: TLS, hyper's HTTP/2 state, its per-stream bridge to Python) and how much
hcsdk's (sessions, mailboxes, the tasks behind them), this serves the same N connections, each in
a fresh server process, from three apps of growing weight:

    bare         (opt-in) TLS and HTTP/2 only: no stream, so no Python at all per connection
    empty        one never-ending GET response per connection, nothing else (like the downlink)
    two_streams  that, plus a never-ending POST body read in a receive() loop (like the uplink)
    mailbox      two_streams with the GET served by hcsdk's real writer, stream_mailbox(), from
                 a Mailbox per connection kept in a dict (as the master keeps sessions)

The server is granian embedded exactly as the master embeds it (hcsdk.net.serve.granian_server:
TLS, ALPN h2, the same HTTP/2 settings); the clients are hcsdk's own H2Connection, in a separate
process, each from its own loopback address (127.1.x.y) so ports never run out. Per connection:
(RSS with all N held, after settling - RSS before any) / N. A benchmark, not a test: run it by hand.

    python bench/conn_memory.py [--n 2000] [--variants [bare,]empty,two_streams,mailbox] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import anyio
import psutil

from agent.swarm import source_address
from hcsdk.net.asgi import ClientGone, body_chunks
from hcsdk.net.h2conn import H2Connection, H2Error
from hcsdk.net.mailbox import Mailbox, stream_mailbox
from hcsdk.net.serve import bound_port, granian_server, stop_server
from hcsdk.net.tls import client_context, issue_server_cert, make_ca

#: the streams each client connection holds, per variant (``bare``, opt-in: TLS and HTTP/2 only)
STREAMS = {"bare": 0, "empty": 1, "two_streams": 2, "mailbox": 2}
VARIANTS = ("empty", "two_streams", "mailbox")  # the default run
KiB, MiB = 1024, 2**20
HOST = "127.0.0.1"

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: 10,000 connections are 10,000 descriptors."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the server process ----------------------------------------------------------------------


class BenchApp:
    """The ASGI app of one variant; counts the streams it holds, answers GET /count."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.held = {"down": 0, "up": 0}
        self.boxes: dict[str, Mailbox] = {}
        self.serial = itertools.count()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/count":
            await self.respond(send, json.dumps(self.held).encode())
        elif path == "/down":
            await self.hold("down", self.down(receive, send))
        elif path == "/up":
            await self.hold("up", self.up(receive))
            await self.respond(send, b"")
        else:
            await self.respond(send, b"no route", 404)

    async def hold(self, what: str, body: Awaitable[None]) -> None:
        self.held[what] += 1
        try:
            await body
        finally:
            self.held[what] -= 1

    async def down(self, receive: Receive, send: Send) -> None:
        if self.variant == "mailbox":
            box = Mailbox(f"conn-{next(self.serial)}")
            self.boxes[box.uuid] = box
            try:
                await stream_mailbox(box, receive, send, heartbeat=60.0, max_frame=4 * MiB)
            finally:
                self.boxes.pop(box.uuid, None)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive())["type"] != "http.disconnect":
            pass  # never a body end: the stream stays open until the client leaves

    async def up(self, receive: Receive) -> None:
        if self.variant == "mailbox":
            try:
                async for _ in body_chunks(receive):  # as the master's uplink reads it
                    pass
            except ClientGone:
                pass
            return
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect" or not msg.get("more_body"):
                return

    @staticmethod
    async def respond(send: Send, body: bytes, status: int = 200) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def run_server(variant: str, certs: Path) -> None:
    server = granian_server(BenchApp(variant), HOST, 0, certs / "server.pem", certs / "server.key",
                            http2=True, heartbeat=5.0, dead_after=15.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        print(await bound_port(), flush=True)  # the parent reads the port from here
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        await stop_server(server, grace=2.0)
        tg.cancel_scope.cancel()


# -- the client process ----------------------------------------------------------------------


async def open_one(index: int, url: str, ctx: Any, streams: int, gate: asyncio.Semaphore,
                   conns: list[H2Connection]) -> bool:
    async with gate:
        try:
            conn = await H2Connection.open(url, ctx, {}, local_address=source_address(index), timeout=30.0)
            if streams >= 1:
                conn.start("GET", "/down")
            if streams >= 2:
                conn.start("POST", "/up")  # no end_stream: a body that never ends
        except H2Error as exc:
            print(f"connection {index}: {exc}", file=sys.stderr, flush=True)
            return False
        conns.append(conn)
        return True


async def run_clients(n: int, url: str, ca_pem: bytes, streams: int, concurrency: int) -> None:
    ctx = client_context(ca_pem)
    gate = asyncio.Semaphore(concurrency)
    conns: list[H2Connection] = []
    results = await asyncio.gather(*(open_one(i, url, ctx, streams, gate, conns) for i in range(n)))
    print(f"opened {sum(results)} {n - sum(results)}", flush=True)
    await asyncio.Event().wait()  # hold them (and answer granian's PINGs) until killed


def client_main(args: argparse.Namespace) -> None:
    ca_pem = (args.certs / "ca.pem").read_bytes()
    main = run_clients(args.n, args.url, ca_pem, STREAMS[args.variant], args.concurrency)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)  # as zy swarm runs: the client side is not what is measured


# -- the parent: certificates, processes, figures -------------------------------------------


def make_certs(root: Path) -> None:
    ca_cert, ca_key = make_ca("conn_memory bench CA")
    cert, key = issue_server_cert(ca_cert, ca_key, [HOST, "localhost"])
    (root / "ca.pem").write_bytes(ca_cert)
    (root / "server.pem").write_bytes(cert)
    (root / "server.key").write_bytes(key)


def spawn(role: str, variant: str, certs: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--role", role, "--variant", variant, "--certs", str(certs), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def read_line(stream: IO[str] | None, what: str) -> str:
    line = stream.readline() if stream is not None else ""
    if not line:
        raise RuntimeError(f"the {what} process ended before it said anything")
    return line.strip()


def held(url: str, ca: Path) -> dict[str, int]:
    """The streams the server holds, asked on a connection of its own (closed after)."""
    ctx = client_context(ca.read_bytes())

    async def ask() -> dict[str, int]:
        conn = await H2Connection.open(url, ctx, {})
        try:
            return dict((await conn.request("GET", "/count", timeout=10.0)).json())
        finally:
            conn.close()
            await asyncio.sleep(0.05)  # let the close reach the server
    return asyncio.run(ask())


def established(pid: int) -> int:
    """The server's established TCP connections (``bare`` holds no stream the app could count)."""
    return sum(c.status == psutil.CONN_ESTABLISHED for c in psutil.Process(pid).net_connections(kind="tcp"))


def wait_held(pid: int, url: str, ca: Path, want: int, streams: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = held(url, ca) if streams else {"connections": established(pid)}
        if all(v >= want for v in list(counts.values())[:max(streams, 1)]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {counts} of {want} connections held after {timeout:g}s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(variant: str, n: int, certs: Path, concurrency: int, settle: float) -> dict[str, Any]:
    server = spawn("server", variant, certs)
    client: subprocess.Popen[str] | None = None
    try:
        url = f"https://{HOST}:{read_line(server.stdout, 'server')}"
        held(url, certs / "ca.pem")  # the first request warms up the code paths, outside the figure
        time.sleep(0.5)
        proc = psutil.Process(server.pid)
        before = proc.memory_info().rss
        t0 = time.monotonic()
        client = spawn("client", variant, certs, "--n", str(n), "--url", url, "--concurrency", str(concurrency))
        ok, failed = map(int, read_line(client.stdout, "client").split()[1:])
        wait_held(server.pid, url, certs / "ca.pem", ok, STREAMS[variant], timeout=120.0)
        opened_s = time.monotonic() - t0
        time.sleep(settle)
        after = proc.memory_info().rss
        return {"variant": variant, "connections": ok, "failed": failed, "open_seconds": opened_s,
                "rss_before_mib": before / MiB, "rss_after_mib": after / MiB,
                "kib_per_conn": (after - before) / max(ok, 1) / KiB}
    finally:
        for p in (client, server):
            if p is not None:
                stop(p)


def report(r: dict[str, Any]) -> str:
    failed = f", {r['failed']} failed" if r["failed"] else ""
    return (f"{r['variant']}: {r['connections']} connections{failed}, {r['kib_per_conn']:.1f} KiB each "
            f"(server RSS {r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} MiB; "
            f"opened in {r['open_seconds']:.1f}s)")


def parent_main(args: argparse.Namespace) -> None:
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(STREAMS)
    if unknown:
        sys.exit(f"unknown variants: {', '.join(sorted(unknown))} (known: {', '.join(STREAMS)})")
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="zy-conn-memory-") as tmp:
        make_certs(Path(tmp))
        for variant in variants:
            r = measure(variant, args.n, Path(tmp), args.concurrency, args.settle)
            print(report(r), flush=True)
            results[variant] = round(r["kib_per_conn"], 2)
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=2000, help="connections to hold (default 2000)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, of {', '.join(STREAMS)} (default: {','.join(VARIANTS)})")
    ap.add_argument("--concurrency", type=int, default=100, help="handshakes in flight at once")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between the last connection and the RSS")
    ap.add_argument("--json", metavar="FILE", help="also write {variant: KiB per connection} here")
    # the child processes: this same file with a role
    ap.add_argument("--role", choices=["parent", "server", "client"], default="parent", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="empty", help=argparse.SUPPRESS)
    ap.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    raise_nofile()
    if args.role == "server":
        anyio.run(run_server, args.variant, args.certs)
    elif args.role == "client":
        client_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
