"""Wake-ups: a nudge from one master to others to look at the store again (issue 15).

A wake-up carries ids only (``d:<run_id>``, ``s:<uuid>:<epoch>``, run ids), never payloads: the
store holds the truth. Wake-ups may be lost (a LISTEN connection that was down, a send that
failed), so every receiver also sweeps the store now and then; a wake-up only makes it sooner.

- ``LocalWakeups`` (SQLite, one master): ``send`` calls this process's subscribers directly.
- ``PgWakeups`` (PostgreSQL, several masters): ``send`` is ``pg_notify`` on a connection of its
  own, ids joined by "," in payloads kept under ``MAX_PAYLOAD`` bytes (PostgreSQL refuses 8000);
  ``run`` holds one LISTEN connection, asks it ``SELECT 1`` every ``probe_every`` seconds (a
  connection that died silently stops answering: AWX's LISTEN connections did), and replaces a
  dead one with backoff, then calls ``on_reconnect`` so the caller sweeps what the gap lost.

Channels are PostgreSQL identifiers: ``channel_name`` turns any name into one ([a-z0-9_], at
most 63 characters), and both classes apply it, so a caller may pass any string.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import anyio
import psycopg
from psycopg import sql

from hcsdk.common.backoff import Backoff

__all__ = ["MAX_PAYLOAD", "RUNS", "LocalWakeups", "PgWakeups", "Wakeups", "channel_name", "master_channel",
           "open_wakeups", "payloads"]

log = logging.getLogger("zy.master.wakeups")

#: the channel of run ids whose events changed (every master's SDK streams)
RUNS = "zy_runs"
#: bytes a payload may have (PostgreSQL's limit is 8000, less the channel name's share)
MAX_PAYLOAD = 7900
#: PostgreSQL truncates identifiers longer than this
_MAX_IDENT = 63
_NOT_IDENT = re.compile(r"[^a-z0-9_]")

Callback = Callable[[list[str]], None]


class Wakeups(Protocol):
    async def send(self, channel: str, ids: Iterable[str]) -> None:
        """Wake ``channel``'s listeners with ``ids`` (joined by ","; split to fit). Never raises
        for a store that is away: the wake-up is lost and the receivers' sweeps find the work."""
        ...

    def subscribe(self, channel: str, callback: Callable[[list[str]], None]) -> None: ...

    async def run(self) -> None:
        """The listening loop; returns only when cancelled."""
        ...


def channel_name(channel: str) -> str:
    """``channel`` as a PostgreSQL identifier: lower case, [a-z0-9_], at most 63 characters. A
    name that had to change gets a short digest of the original, so two names never merge."""
    clean = _NOT_IDENT.sub("_", channel.lower())
    if clean == channel and 0 < len(clean) <= _MAX_IDENT:
        return clean
    digest = hashlib.sha256(channel.encode()).hexdigest()[:8]
    return f"{clean[:_MAX_IDENT - 9]}_{digest}"


def master_channel(master_id: str) -> str:
    """The channel that wakes one master (``m-1a2b`` -> ``zy_m_m_1a2b``)."""
    return channel_name("zy_m_" + master_id.lower().replace("-", "_"))


def payloads(ids: Iterable[str], limit: int = MAX_PAYLOAD) -> list[str]:
    """``ids`` joined by "," in as few payloads as fit ``limit`` bytes each (UTF-8)."""
    out: list[str] = []
    part: list[str] = []
    size = 0
    for i in ids:
        _check_id(i, limit)
        n = len(i.encode())
        if part and size + 1 + n > limit:
            out.append(",".join(part))
            part, size = [], 0
        size += n + (1 if part else 0)
        part.append(i)
    if part:
        out.append(",".join(part))
    return out


def _check_id(i: Any, limit: int) -> None:
    if not isinstance(i, str) or not i or "," in i or len(i.encode()) > limit:
        raise ValueError(f"a wake-up id must be a non-empty string without ',' of at most {limit} bytes: {i!r:.80}")


def _split(payload: str) -> list[str]:
    return [i for i in payload.split(",") if i]


class _Subscribers:
    """Callbacks by channel (its PostgreSQL name); a failing callback is logged, the rest still
    run. Callbacks run in the listening loop: they should be quick (set an event, start a task)."""

    def __init__(self) -> None:
        self._subs: dict[str, list[Callback]] = {}

    def subscribe(self, channel: str, callback: Callback) -> None:
        self._subs.setdefault(channel_name(channel), []).append(callback)

    def _deliver(self, channel: str, ids: list[str]) -> None:
        for callback in list(self._subs.get(channel, ())):
            try:
                callback(ids)
            except Exception:
                log.exception("a wake-up subscriber of %s failed", channel)


class LocalWakeups(_Subscribers):
    """One master (SQLite): a wake-up goes to this object's own subscribers, at once."""

    def __init__(self, *, on_reconnect: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.on_reconnect = on_reconnect  # never called: nothing here can be lost

    async def send(self, channel: str, ids: Iterable[str]) -> None:
        # the same checks as PostgreSQL's, so a caller's mistake shows on SQLite too
        for payload in payloads(ids):
            self._deliver(channel_name(channel), _split(payload))

    async def run(self) -> None:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        pass


class PgWakeups(_Subscribers):
    """LISTEN/NOTIFY over PostgreSQL at ``url``. ``application_name`` names its connections
    (``<name>-listen``, ``<name>-send``) in ``pg_stat_activity``."""

    def __init__(self, url: str, *, on_reconnect: Callable[[], None] | None = None,
                 application_name: str = "zy-wakeups", probe_every: float = 3.0, probe_timeout: float = 5.0,
                 backoff: Backoff | None = None) -> None:
        super().__init__()
        self.url = url
        self.on_reconnect = on_reconnect
        self.application_name = application_name
        self.probe_every = probe_every
        self.probe_timeout = probe_timeout
        self._backoff = backoff or Backoff(0.2, 5.0)
        #: how many LISTEN connections were made (the first, then each replacement)
        self.connects = 0
        self._ready = anyio.Event()
        self._sender: psycopg.AsyncConnection[Any] | None = None
        self._send_lock = anyio.Lock()

    # -- sending ----------------------------------------------------------------------------
    async def send(self, channel: str, ids: Iterable[str]) -> None:
        parts = payloads(ids)
        if not parts:
            return
        for attempt in (1, 2):  # a sender connection that died since the last send: once more on a new one
            try:
                with anyio.fail_after(self.probe_timeout * 2):
                    await self._notify(channel_name(channel), parts)
                return
            except (psycopg.Error, OSError, TimeoutError) as exc:
                await self._drop_sender()
                if attempt == 2:
                    log.warning("wake-up on %s lost (%d ids): %s", channel, sum(p.count(",") + 1 for p in parts), exc)

    async def _notify(self, channel: str, parts: list[str]) -> None:
        async with self._send_lock:
            if self._sender is None or self._sender.closed:
                self._sender = await self._connect("send")
            # one statement, one transaction: every part is queued together, in order
            await self._sender.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) WITH ORDINALITY AS u(p, n) "
                                       "ORDER BY n", (channel, parts))

    async def _drop_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            await _close(sender)

    # -- listening --------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._listen()
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    log.warning("wake-up connection lost (%s); reconnecting", exc)
                except Exception:  # never let the loop die: the master would lose every wake-up
                    log.exception("wake-up connection failed; reconnecting")
                await anyio.sleep(self._backoff.next_delay())
        finally:
            with anyio.CancelScope(shield=True):
                await self._drop_sender()

    async def wait_listening(self) -> None:
        """Until a LISTEN connection listens on every channel subscribed so far."""
        while True:
            ready = self._ready
            await ready.wait()
            if ready is self._ready:
                return

    async def _listen(self) -> None:
        conn = await self._connect("listen")
        try:
            listened: set[str] = set()
            await self._listen_new(conn, listened)
            self.connects += 1
            self._backoff.reset()
            if self.connects > 1 and self.on_reconnect is not None:
                self._call_on_reconnect()
            await self._pump(conn, listened)
        finally:
            if self._ready.is_set():
                self._ready = anyio.Event()
            with anyio.CancelScope(shield=True):
                await _close(conn)

    async def _pump(self, conn: psycopg.AsyncConnection[Any], listened: set[str]) -> None:
        """Deliver notifications; LISTEN to channels subscribed meanwhile; probe the connection."""
        probe_at = time.monotonic() + self.probe_every
        while True:
            # short waits: a channel subscribed while this waits is listened to soon after
            async for note in conn.notifies(timeout=min(0.5, self.probe_every)):
                if ids := _split(note.payload):  # (a NOTIFY from elsewhere may carry none)
                    self._deliver(note.channel, ids)
            await self._listen_new(conn, listened)
            if time.monotonic() >= probe_at:
                # a connection that died silently (no RST: a host gone, a frozen backend) does
                # not answer; fail_after notices it
                with anyio.fail_after(self.probe_timeout):
                    await conn.execute("SELECT 1")
                probe_at = time.monotonic() + self.probe_every

    async def _listen_new(self, conn: psycopg.AsyncConnection[Any], listened: set[str]) -> None:
        for channel in [c for c in self._subs if c not in listened]:
            with anyio.fail_after(self.probe_timeout):
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            listened.add(channel)
        if listened.issuperset(self._subs):
            self._ready.set()

    def subscribe(self, channel: str, callback: Callback) -> None:
        """Listen to ``channel`` too (from the next turn of ``run``'s loop: within half a second)."""
        if channel_name(channel) not in self._subs and self._ready.is_set():
            self._ready = anyio.Event()  # not listening on everything any more
        super().subscribe(channel, callback)

    def _call_on_reconnect(self) -> None:
        assert self.on_reconnect is not None
        try:
            self.on_reconnect()
        except Exception:
            log.exception("the wake-ups' on_reconnect callback failed")

    async def _connect(self, role: str) -> psycopg.AsyncConnection[Any]:
        with anyio.fail_after(self.probe_timeout * 2):
            # keepalives: the kernel notices a peer that vanished even while nothing is sent
            return await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, application_name=f"{self.application_name}-{role}"[:_MAX_IDENT],
                connect_timeout=max(2, int(self.probe_timeout)), keepalives=1, keepalives_idle=10,
                keepalives_interval=5, keepalives_count=3)

    async def aclose(self) -> None:
        await self._drop_sender()


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    """Close without waiting on a peer that may not answer."""
    try:
        with anyio.move_on_after(2):
            await conn.close()
    except (psycopg.Error, OSError):
        pass


def open_wakeups(store_url: str | None, *, on_reconnect: Callable[[], None] | None = None,
                 application_name: str = "zy-wakeups") -> Wakeups:
    """Wake-ups for the store at ``store_url``: in-process for SQLite (``None``), LISTEN/NOTIFY
    for a ``postgresql://`` URL."""
    if store_url is None:
        return LocalWakeups(on_reconnect=on_reconnect)
    if not store_url.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"wake-ups need a postgresql:// store URL, not {store_url!r}")
    return PgWakeups(store_url, on_reconnect=on_reconnect, application_name=application_name)
