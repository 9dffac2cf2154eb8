"""Fetching a release's missing chunks into its part file (the agent's side of the swarm).

One dispatcher asks the proxy's tracker for as many chunks as it has free transfers
(``parallel``), each with its source: a peer holding it, or the proxy (see proxy.tracker). The
same ask reports the chunks got since the last one and the sources that failed, so a chunk
costs about one tracker round trip. Without a tracker (p2p off, or an agent straight on the
master) chunks come from the upstream in file order. Every copy is checked against the signed
manifest before it is written, once, at its offsets; a bad source is noted and reported, and
the chunk asked for again.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import anyio

from hcsdk.protocol.manifest import Manifest, ManifestError

from ..executor import TaskFailed
from .chunkstore import PART_SUFFIX, ChunkStore, start_writeback
from .peer import RateLimit, fetch_from_peer

#: what a chunk arrives in: the proxy's answer, or a reused buffer (from a peer)
Buffer = bytes | bytearray | memoryview
#: failures from the upstream for one chunk before the fetch fails, with a growing pause between
#: them (about a minute in all: a proxy or master restart ends sessions for a few seconds only)
TRIES = 8
#: chunks an agent offers the tracker to choose from, first missing first
WANT_WINDOW = 64


class TrackerClient:
    """This agent in its proxy's swarm, as the tracker knows it: the port it serves chunks on and
    every chunk it has announced (over all releases), through the tracker."""

    def __init__(self, channel: Any, port: int, slots: int) -> None:
        self.channel = channel
        self.port = port
        self.slots = slots
        self.held: set[str] = set()
        self.unsent: set[str] = set()  # held, not yet told to the tracker
        self.dropped: set[str] = set()  # no longer held, not yet told to the tracker
        self._announced_in: str | None = None  # the session the tracker knows our chunks from

    def note(self, chunks: list[str]) -> None:
        self.held.update(chunks)
        self.unsent.update(chunks)
        self.dropped.difference_update(chunks)

    def forget(self, chunks: set[str]) -> None:
        """Chunks no longer held (an old release removed): the tracker hears it next time."""
        self.held -= chunks
        self.unsent -= chunks
        self.dropped |= chunks

    def _news(self) -> list[str]:
        """What to tell the tracker we hold: everything when our session is new (a restarted
        proxy knows nothing), else what it has not heard yet."""
        return sorted(self.held if self.channel.sid != self._announced_in else self.unsent)

    async def _call(self, path: str, body: dict[str, Any]) -> Any:
        resp = await self.channel.request("POST", f"{path}?sid={self.channel.sid or ''}",
                                          content=json.dumps(body).encode(),
                                          headers={"content-type": "application/json"}, timeout=30.0)
        return resp.json() if resp.status_code == 200 else None

    async def announce(self) -> bool:
        """Tell the tracker our port and what we hold; False when there is none upstream
        (straight on the master) or it cannot be reached."""
        sid, news, dropped = self.channel.sid, self._news(), sorted(self.dropped)
        try:
            known = await self._call("/v1/tracker/announce", {"port": self.port, "slots": self.slots,
                                                              "chunks": news, "dropped": dropped}) is not None
        except Exception:
            return False
        if known:
            self._announced_in = sid
            self.unsent.difference_update(news)
            self.dropped.difference_update(dropped)
        return known

    async def next(self, want: list[str], failed: list[dict[str, str]], most: int) -> list[dict[str, Any]] | None:
        """Up to ``most`` grants ({"sha", "peer"}) among ``want``; None when the tracker cannot
        be asked."""
        if self.channel.sid != self._announced_in and not await self.announce():
            return None
        got = sorted(self.unsent)
        try:
            answer = await self._call("/v1/tracker/next", {"want": want, "failed": failed, "got": got, "max": most})
        except Exception:
            return None
        if not isinstance(answer, dict) or not isinstance(answer.get("grants"), list):
            return None
        self.unsent.difference_update(got)
        return [g for g in answer["grants"] if isinstance(g, dict)]


class Job:
    """One fetch: the manifest, the part file being filled at each chunk's offset, and which
    chunks are still missing or on their way."""

    def __init__(self, manifest: Manifest, home: Path, store: ChunkStore) -> None:
        self.manifest = manifest
        self.store = store
        self.final = home / manifest.name
        self.part = home / f".{manifest.name}{PART_SUFFIX}"
        #: a chunk that occurs twice is fetched once and written at each of its offsets
        self.offsets: dict[str, list[int]] = {}
        for index, sha in enumerate(manifest.chunks):
            self.offsets.setdefault(sha, []).append(index * manifest.chunk_size)
        self.first = {sha: offsets[0] // manifest.chunk_size for sha, offsets in self.offsets.items()}
        self.pending = sorted(self.first.values())
        self.inflight: set[int] = set()
        self.failures: dict[int, tuple[int, int]] = {}  # index -> (from the upstream, from peers)
        self.failed: list[dict[str, str]] = []  # told to the tracker with the next ask
        self.fd: int | None = None
        self.tracker: TrackerClient | None = None
        self.peer_key = ""  # the release's: what peers' tokens are made with
        self.stats: dict[str, Any] = {"reused": 0, "bytes_upstream": 0, "bytes_peers": 0, "corrupt": []}
        self.asking = False
        self.settled = anyio.Event()  # set (and replaced) whenever a transfer ends
        self._buffers: list[bytearray] = []  # reused: a fresh 4 MiB buffer a chunk costs page faults

    def offset(self, index: int) -> int:
        return index * self.manifest.chunk_size

    def check(self, index: int, data: Buffer) -> bool:
        try:
            self.manifest.check_chunk(index, data)
        except ManifestError:
            return False
        return True

    def held(self, index: int) -> bool:
        """Whether the part file already has chunk ``index`` intact at every offset it occurs."""
        assert self.fd is not None
        size = self.manifest.chunk_length(index)
        return all(self.check(index, os.pread(self.fd, size, at)) for at in self.offsets[self.manifest.chunks[index]])

    def copy(self, fd: int, index: int) -> bool:
        """Chunk ``index`` from the same offset of another file of this release, if intact there."""
        return self.write(index, os.pread(fd, self.manifest.chunk_length(index), self.offset(index)))

    def write(self, index: int, data: Buffer) -> bool:
        """Check a chunk and write it at each of its offsets; False when it is not the chunk."""
        assert self.fd is not None
        if not self.check(index, data):
            return False
        for at in self.offsets[self.manifest.chunks[index]]:
            os.pwrite(self.fd, data, at)
            start_writeback(self.fd, at, len(data))
        return True

    async def ask(self, most: int) -> list[tuple[int, str]]:
        """Up to ``most`` chunks to start now, each with its source ("host:port" of a peer, ""
        for the upstream)."""
        if self.tracker is None:
            return [self._take(index, "") for index in self.pending[:most]]
        failed, self.failed = self.failed, []
        self.asking = True
        try:
            want = [self.manifest.chunks[i] for i in self.pending[:WANT_WINDOW]]
            grants = await self.tracker.next(want, failed, most)
        finally:
            self.asking = False
        if grants is None:  # no tracker right now: the upstream, which backs off if it is down too
            return [self._take(self.pending[0], "")] if self.pending else []
        picks = []
        for grant in grants:
            index = self.first.get(str(grant.get("sha")))
            if index is not None and index in self.pending:
                picks.append(self._take(index, str(grant.get("peer") or "")))
        return picks

    def _take(self, index: int, source: str) -> tuple[int, str]:
        self.pending.remove(index)
        self.inflight.add(index)
        return index, source

    def settle(self) -> None:
        self.settled.set()
        self.settled = anyio.Event()

    def buffer(self) -> bytearray:
        return self._buffers.pop() if self._buffers else bytearray(self.manifest.chunk_size)

    def give_back(self, buffer: bytearray) -> None:
        self._buffers.append(buffer)

    async def retry(self, index: int, source: str) -> None:
        """Ask for a chunk again after ``source`` failed to give it intact; after ``TRIES``
        failures from the upstream (with growing pauses) the fetch fails."""
        self.failed.append({"sha": self.manifest.chunks[index], "peer": source})
        upstream, peers = self.failures.get(index, (0, 0))
        upstream, peers = (upstream, peers + 1) if source else (upstream + 1, peers)
        self.failures[index] = (upstream, peers)
        if upstream >= TRIES or peers >= 4 * TRIES:
            raise TaskFailed(f"chunk {index} could not be fetched intact from any source ({upstream} tries from "
                             f"the upstream, {peers} from peers); sources noted in stderr")
        if not source:
            await anyio.sleep(min(2 * upstream, 10))
        bisect.insort(self.pending, index)
        self.inflight.discard(index)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


async def fetch_missing(job: Job, channel: Any, parallel: int, pace: RateLimit) -> None:
    """Fetch every pending chunk of ``job``, ``parallel`` transfers at a time."""
    async with anyio.create_task_group() as tg:
        while job.pending or job.inflight:
            idle = parallel - len(job.inflight)
            if idle <= 0 or not job.pending:
                await job.settled.wait()
                continue
            picks = await job.ask(idle)
            for index, source in picks:
                tg.start_soon(_fetch_one, job, channel, index, source, pace)
            if not picks:
                await anyio.sleep(0.05)  # the tracker already waited for a change; do not spin
    if job.tracker is not None and job.tracker.unsent:
        await job.tracker.announce()


async def _fetch_one(job: Job, channel: Any, index: int, source: str, pace: RateLimit) -> None:
    sha, size = job.manifest.chunks[index], job.manifest.chunk_length(index)
    buffer = job.buffer() if source else None
    try:
        data = await _from(job, channel, source, index, buffer)
        if data is not None and await anyio.to_thread.run_sync(job.write, index, data):
            await pace.take(size)
            job.stats["bytes_peers" if source else "bytes_upstream"] += size
            job.store.add(sha, job.part, job.offset(index), size)
            job.inflight.discard(index)
            if job.tracker is not None:
                job.tracker.note([sha])
                if job.asking:  # the dispatcher's ask is waiting on the tracker: say it now
                    await job.tracker.announce()
            return
        if data is not None:
            job.stats["corrupt"].append(f"corrupt chunk {index} from {source or 'upstream'}")
        await job.retry(index, source)
    finally:
        if buffer is not None:
            job.give_back(buffer)
        job.settle()


async def _from(job: Job, channel: Any, source: str, index: int, buffer: bytearray | None) -> Buffer | None:
    sha, size = job.manifest.chunks[index], job.manifest.chunk_length(index)
    if source:
        assert job.tracker is not None and buffer is not None
        try:
            return await fetch_from_peer(source, sha, job.peer_key, memoryview(buffer)[:size])
        except (OSError, ValueError, TimeoutError) as exc:
            job.stats["corrupt"].append(f"peer {source} could not give chunk {index}: {exc}")
            return None
    try:
        resp = await channel.bulk_request("GET", f"/v1/blob?sha256={sha}&sid={channel.sid or ''}", timeout=300.0)
    except Exception as exc:
        job.stats["corrupt"].append(f"upstream could not give chunk {index}: {exc}")
        return None
    if resp.status_code != 200:
        job.stats["corrupt"].append(f"upstream answered {resp.status_code} for chunk {index}")
        return None
    return bytes(resp.content)
