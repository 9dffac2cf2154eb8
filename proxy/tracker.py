"""The proxy as tracker: which of its clients hold which chunk (a central tracker; no DHT, no
broadcast in the customer's network). Agents announce chunks as they get them; a lookup
answers, per chunk, a few peers (random among the holders, so load spreads) and how many hold it.
A client's announcements end with its session. Nothing here is durable: agents announce again
when their session is new (after a proxy restart, say).

Being central, the tracker also schedules: an agent asks ``next`` with the chunks it still
wants and is told which one to fetch and from where (:meth:`Tracker.next`). The proxy seeds each
chunk to ``seed_copies`` agents only (super-seeding), and the rest of the swarm takes it from
them, rarest chunk first, from the holder with the fewest uploads running; a chunk nobody has
yet waits for its seed rather than being pulled from the proxy again (for ``SLOW_SEED`` seconds
at most: a stuck agent does not hold up the swarm). Chunks the proxy does not
hold yet are handed out ``upstream_parallel`` at a time and in the order asked for, so they cross
a thin upstream link one after the other instead of all arriving together at the end.

What a client says it holds is not trusted: the proxy lists it only for chunks of releases the
master sent that uuid (:class:`Releases`, learnt from the ``zy.release.fetch`` commands that
pass down through the proxy) or chunks the proxy's own cache holds, and the listings have hard
caps per session and in all (:class:`TrackerFull`, a 413), so invented hashes cost nothing.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any

import anyio

from hcsdk.protocol import vocab
from hcsdk.protocol.errors import MessageError
from hcsdk.protocol.messages import DOWN, Task, parse
from hcsdk.protocol.names import is_sha256

MAX_ANNOUNCE = 100_000
MAX_WANT = 1024
UPSTREAM = ""
#: a grant nobody reported back ends by itself (a peer transfer of one chunk on a LAN takes
#: seconds; one from the proxy may wait behind a thin link)
PEER_GRANT_TTL = 60.0
UPSTREAM_GRANT_TTL = 600.0
#: a chunk the proxy holds, that nobody has delivered for this long since it was last handed
#: out, is given by the proxy again: one slow or stuck agent does not hold up the swarm
SLOW_SEED = 10.0
#: (session, chunk) listings kept for one session, and for all of them: about 100 bytes each
MAX_PER_SESSION = MAX_ANNOUNCE
MAX_LISTINGS = 2_000_000
#: chunk names of releases remembered (all releases together), and releases per uuid
MAX_RELEASE_CHUNKS = 1_000_000
MAX_RELEASES_PER_UUID = 32
MAX_UUIDS = 100_000
FETCH_CMD = vocab.RELEASE_FETCH


class TrackerError(ValueError):
    pass


class NotGranted(TrackerError):
    """A client asked to be scheduled a chunk of no release the master sent it (a 403)."""


#: sha -> the canonical string when the asking client may be listed for (or fetch) it, else None
Known = Callable[[str], "str | None"]


class TrackerFull(TrackerError):
    """A listing cap is reached: the request is refused whole (a 413); the agent fetches from
    the upstream instead, as it does with no tracker."""


class Releases:
    """Which chunks belong to the releases the master sent each uuid. Learnt from the signed
    ``zy.release.fetch`` commands that pass down through the proxy (its upstream is trusted;
    clients are not). Each release's chunk names are kept once, whatever the number of agents
    given it, as the canonical strings the tracker then stores; the oldest releases are
    forgotten beyond ``MAX_RELEASE_CHUNKS`` names in all."""

    def __init__(self, max_chunks: int = MAX_RELEASE_CHUNKS) -> None:
        self.max_chunks = max_chunks
        #: release digest -> {sha: sha} (the one copy of each name), least recently sent first
        self.chunks: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._names = 0
        #: uuid -> digests of the releases sent to it, oldest first
        self.granted: OrderedDict[str, list[str]] = OrderedDict()

    def note(self, msg: dict[str, Any]) -> None:
        """Look at a message going down: remember a release fetch's chunks for its uuid."""
        if msg.get("t") != "task" or msg.get("cmd") != FETCH_CMD:
            return
        try:
            task = parse(msg, DOWN)
        except MessageError:
            return
        args = task.args if isinstance(task, Task) else {}
        manifest, digest = args.get("manifest"), args.get("digest")
        chunks = manifest.get("chunks") if isinstance(manifest, dict) else None
        if not isinstance(digest, str) or not is_sha256(digest) or not isinstance(chunks, list):
            return
        self.grant(task.uuid, digest, [c for c in chunks if is_sha256(c)])

    def grant(self, uuid: str, digest: str, chunks: list[str]) -> None:
        if digest in self.chunks:
            self.chunks.move_to_end(digest)
        else:
            names = {sha: sha for sha in chunks}
            self.chunks[digest] = names
            self._names += len(names)
            while self._names > self.max_chunks and len(self.chunks) > 1:
                self._names -= len(self.chunks.popitem(last=False)[1])
        mine = self.granted.pop(uuid, [])
        if digest in mine:
            mine.remove(digest)
        mine.append(digest)
        self.granted[uuid] = mine[-MAX_RELEASES_PER_UUID:]
        while len(self.granted) > MAX_UUIDS:
            self.granted.popitem(last=False)

    def known(self, uuid: str, sha: str) -> str | None:
        """``sha`` as the canonical string when it is a chunk of a release sent to ``uuid``."""
        for digest in self.granted.get(uuid, ()):
            name = self.chunks.get(digest, {}).get(sha)
            if name is not None:
                return name
        return None


@dataclass
class Grant:
    source: str  # the serving peer's session id, or UPSTREAM (the proxy)
    until: float


class Tracker:
    def __init__(self, seed_copies: int = 1, upstream_parallel: int = 2) -> None:
        self.seed_copies = seed_copies
        self.upstream_parallel = upstream_parallel
        #: sha -> session ids holding it
        self.holders: dict[str, set[str]] = {}
        #: session id -> (address "host:port", its chunks); port 0: holds but serves nobody
        self.peers: dict[str, tuple[str, set[str]]] = {}
        self.slots: dict[str, int] = {}
        #: (fetching session id, sha) -> where it was told to fetch from
        self.grants: dict[tuple[str, str], Grant] = {}
        #: serving session id -> transfers granted from it now
        self.load: dict[str, int] = {}
        #: sha -> agents granted it now
        self.fetchers: dict[str, int] = {}
        #: sha -> times the proxy was granted as its source
        self.seeded: dict[str, int] = {}
        #: sha -> when it was last granted (from anywhere)
        self.last_grant: dict[str, float] = {}
        #: (fetching session id, sha, serving session id) that failed: not granted again
        self.bad: set[tuple[str, str, str]] = set()
        self.changed = anyio.Event()
        #: (session, chunk) listings held now, over all sessions
        self.listings = 0
        self.max_per_session = MAX_PER_SESSION
        self.max_listings = MAX_LISTINGS

    # -- what agents hold ------------------------------------------------------------------------
    def announce(self, sid: str, host: str, body: Any, known: Known | None = None) -> tuple[int, int]:
        """List ``sid`` as a holder of the chunks it names: (chunks it is listed for now, chunks
        of its list ignored because ``known`` does not know them). An announce naming chunks of
        which ``known`` knows none is refused whole (NotGranted)."""
        if not isinstance(body, dict):
            raise TrackerError("announce wants a JSON object")
        port, chunks, slots = body.get("port"), body.get("chunks", []), body.get("slots", 4)
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise TrackerError("announce needs the peer port (1-65535, or 0: serves nobody)")
        if not isinstance(slots, int) or not 1 <= slots <= 1024:
            raise TrackerError("announce 'slots' must be 1-1024 (uploads this peer serves at once)")
        _check_shas(chunks, "announce 'chunks'")
        dropped = body.get("dropped", [])
        _check_shas(dropped, "announce 'dropped'")
        named = len(chunks)
        chunks, ignored = _only_known(chunks, known)
        if named and not chunks:  # nothing of it could be true: refuse it, plainly
            raise NotGranted(f"none of the {named} chunks announced is part of a release the master sent this "
                             "agent through this proxy, nor held by the proxy")
        _, held = self.peers.get(sid, ("", set()))
        self._check_room(sid, held, chunks, dropped)
        self.peers[sid] = (f"{host}:{port}" if port else "", held)
        self.slots[sid] = slots
        self._drop(sid, dropped)
        return self._hold(sid, chunks), ignored

    def _check_room(self, sid: str, held: set[str], chunks: list[str], dropped: Iterable[str] = ()) -> None:
        """Refuse (whole, before any change) what would take a session or the tracker past its cap."""
        gone = set(dropped) & held
        new = len({c for c in chunks if c not in held or c in gone})
        if len(held) - len(gone) + new > self.max_per_session:
            raise TrackerFull(f"a session may be listed for at most {self.max_per_session} chunks; "
                              f"this would make it {len(held) - len(gone) + new}")
        if self.listings - len(gone) + new > self.max_listings:
            raise TrackerFull(f"the tracker is full ({self.listings} chunk listings, at most {self.max_listings}); "
                              "fetch from the proxy without peers")

    def _drop(self, sid: str, chunks: list[str]) -> None:
        """Chunks this client no longer holds (it removed an old release)."""
        held = self.peers.get(sid, ("", set()))[1]
        before = len(held)
        held.difference_update(chunks)
        self.listings -= before - len(held)
        self._unlist(sid, chunks)

    def _unlist(self, sid: str, chunks: Iterable[str]) -> None:
        for sha in chunks:
            holders = self.holders.get(sha)
            if holders is not None:
                holders.discard(sid)
                if not holders:
                    del self.holders[sha]

    def _hold(self, sid: str, chunks: list[str]) -> int:
        address, held = self.peers.get(sid, ("", set()))
        self._check_room(sid, held, chunks)
        self.peers[sid] = (address, held)
        before = len(held)
        held.update(chunks)
        self.listings += len(held) - before
        for sha in chunks:
            if address:
                self.holders.setdefault(sha, set()).add(sid)
            self._end_grant(sid, sha)
        self._wake()
        return len(held)

    def lookup(self, sid: str, body: Any, live: Container[str]) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("chunks"), list):
            raise TrackerError("lookup wants {'chunks': [sha256, ...]}")
        try:
            want = max(1, min(int(body.get("max", 4)), 16))
        except (TypeError, ValueError):
            raise TrackerError("lookup 'max' must be a number") from None
        _check_shas(body["chunks"], "lookup 'chunks'")
        peers: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        for sha in body["chunks"]:
            holders = self._holders(sha, sid, live)
            counts[sha] = len(holders)
            random.shuffle(holders)
            peers[sha] = [self.peers[s][0] for s in holders[:want]]
        return {"peers": peers, "counts": counts}

    def forget(self, sid: str) -> None:
        _, held = self.peers.pop(sid, ("", set()))
        self.listings -= len(held)
        self.slots.pop(sid, None)
        self._unlist(sid, held)
        for (fetcher, sha), grant in list(self.grants.items()):
            if sid in (fetcher, grant.source):
                self._end_grant(fetcher, sha)
        self.bad = {b for b in self.bad if sid not in (b[0], b[2])}
        self._wake()

    # -- scheduling ------------------------------------------------------------------------------
    def next(self, sid: str, body: Any, live: Container[str], cached: Callable[[str], bool],
             known: Known | None = None) -> dict[str, Any]:
        """Up to ``max`` chunks of ``want`` for this agent to fetch now, and from where:
        ``{"grants": [{"sha", "peer": "host:port" or "" (the proxy)}, ...]}``, none when every
        chunk it wants is on its way to someone it can take it from soon. The same call reports
        chunks the agent ``got`` since it last said (as :meth:`announce` does) and sources that
        ``failed`` it. With ``known``, a wanted chunk it does not know is refused (NotGranted:
        the agent then fetches from the upstream without the tracker), and unknown ``got`` is
        ignored: grants and the per-chunk counters are only ever kept for chunks it knows."""
        want, failed, got, most = _next_body(body)
        if known is not None:
            stranger = next((sha for sha in want if known(sha) is None), None)
            if stranger is not None:
                raise NotGranted(f"chunk {stranger} is not part of a release the master sent this agent "
                                 "through this proxy; fetch it from the upstream")
            got, _ = _only_known(got, known)
        for sha, source in failed:
            self._fail(sid, sha, source)
        if got:
            self._hold(sid, got)
        self._expire(time.monotonic())
        grants = []
        for _ in range(most):
            pick = self._from_peer(sid, want, live) or self._from_upstream(sid, want, live, cached)
            if pick is None:
                break
            sha, source = pick
            self._grant(sid, sha, source)
            grants.append({"sha": sha, "peer": self.peers[source][0] if source else ""})
        return {"grants": grants}

    async def wait_change(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self.changed.wait()

    def _from_peer(self, sid: str, want: list[str], live: Container[str]) -> tuple[str, str] | None:
        """The rarest wanted chunk that some holder has a free upload slot for."""
        best: tuple[tuple[int, float], str, list[str]] | None = None
        for sha in want:
            if (sid, sha) in self.grants:
                continue
            free = [h for h in self._holders(sha, sid, live)
                    if self.load.get(h, 0) < self.slots.get(h, 4) and (sid, sha, h) not in self.bad]
            if free:
                key = (len(self.holders.get(sha, ())) + self._fetching(sha), random.random())
                if best is None or key < best[0]:
                    best = (key, sha, free)
        if best is None:
            return None
        _, sha, free = best
        return sha, min(free, key=lambda h: (self.load.get(h, 0), random.random()))

    def _from_upstream(self, sid: str, want: list[str], live: Container[str],
                       cached: Callable[[str], bool]) -> tuple[str, str] | None:
        """The first wanted chunk the proxy still seeds, or that nobody else can give this agent
        now or soon (no holder, and nobody fetching it or its fetch stalled)."""
        fetching_upstream = sum(1 for (_, sha), g in self.grants.items() if g.source == UPSTREAM and not cached(sha))
        now = time.monotonic()
        for sha in want:
            if (sid, sha) in self.grants:
                continue
            seeding = self.seeded.get(sha, 0) < self.seed_copies
            usable = [h for h in self._holders(sha, sid, live) if (sid, sha, h) not in self.bad]
            stalled = cached(sha) and now - self.last_grant.get(sha, now) > SLOW_SEED
            if not (seeding or (not usable and (not self._fetching(sha) or stalled))):
                continue
            if not cached(sha) and fetching_upstream >= self.upstream_parallel and not self._fetching(sha):
                continue
            return sha, UPSTREAM
        return None

    def _holders(self, sha: str, sid: str, live: Container[str]) -> list[str]:
        return [s for s in self.holders.get(sha, ()) if s != sid and s in live]

    def _fetching(self, sha: str) -> int:
        return self.fetchers.get(sha, 0)

    def _grant(self, sid: str, sha: str, source: str) -> None:
        self._end_grant(sid, sha)
        ttl = UPSTREAM_GRANT_TTL if source == UPSTREAM else PEER_GRANT_TTL
        now = time.monotonic()
        self.grants[(sid, sha)] = Grant(source, now + ttl)
        self.last_grant[sha] = now
        _count(self.fetchers, sha, 1)
        if source == UPSTREAM:
            self.seeded[sha] = self.seeded.get(sha, 0) + 1
        else:
            _count(self.load, source, 1)

    def _end_grant(self, sid: str, sha: str) -> None:
        grant = self.grants.pop((sid, sha), None)
        if grant is None:
            return
        _count(self.fetchers, sha, -1)
        if grant.source != UPSTREAM:
            _count(self.load, grant.source, -1)

    def _fail(self, sid: str, sha: str, address: str) -> None:
        grant = self.grants.get((sid, sha))
        if grant is not None and grant.source != UPSTREAM and self.peers.get(grant.source, ("",))[0] == address:
            self.bad.add((sid, sha, grant.source))
        self._end_grant(sid, sha)
        self._wake()

    def _expire(self, now: float) -> None:
        for key in [k for k, g in self.grants.items() if g.until < now]:
            self._end_grant(*key)

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    @property
    def stats(self) -> dict[str, int]:
        return {"peers": len(self.peers), "chunks": len(self.holders), "grants": len(self.grants),
                "listings": self.listings}


def _count(counts: dict[str, int], key: str, step: int) -> None:
    left = counts.get(key, 0) + step
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _check_shas(chunks: Any, what: str) -> None:
    if not isinstance(chunks, list) or len(chunks) > MAX_ANNOUNCE or not all(
            is_sha256(c) for c in chunks):
        raise TrackerError(f"{what} must be a list of SHA-256 hex digests")


def _only_known(chunks: list[str], known: Known | None) -> tuple[list[str], int]:
    """The chunks ``known`` knows (as its canonical strings), and how many it did not."""
    if known is None:
        return chunks, 0
    names = [known(sha) for sha in chunks]
    kept = [name for name in names if name is not None]
    return kept, len(chunks) - len(kept)


def _next_body(body: Any) -> tuple[list[str], list[tuple[str, str]], list[str], int]:
    if not isinstance(body, dict):
        raise TrackerError("next wants {'want': [sha256, ...], 'got': [...], 'failed': [{'sha', 'peer'}], 'max': n}")
    want: Any = body.get("want")
    _check_shas(want, "next 'want'")
    if len(want) > MAX_WANT:
        raise TrackerError(f"next 'want' names at most {MAX_WANT} chunks")
    got: Any = body.get("got", [])
    _check_shas(got, "next 'got'")
    failed = body.get("failed", [])
    if not isinstance(failed, list) or not all(
            isinstance(f, dict) and isinstance(f.get("sha"), str) and isinstance(f.get("peer", ""), str)
            for f in failed):
        raise TrackerError("next 'failed' must be a list of {'sha': sha256, 'peer': 'host:port' or ''}")
    most = body.get("max", 1)
    if not isinstance(most, int) or not 1 <= most <= 64:
        raise TrackerError("next 'max' must be 1-64 (chunks the agent can start now)")
    return want, [(f["sha"], f.get("peer", "")) for f in failed], got, most
