"""Coalesced store calls (master/store/offload.py): calls made while one is in flight go
together in one worker-thread hop, each with its own result or exception, and a cancelled
caller never strands the calls queued behind it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from master.store import Coalesced, CoalescedSubsets, SQLiteStore, StoreThread


@pytest.fixture
def thread(tmp_path: Path) -> StoreThread:
    return StoreThread(SQLiteStore(tmp_path / "m.db"))


def slow_double(x: int) -> int:
    time.sleep(0.01)  # long enough that the others arrive while the first is in flight
    if x == 13:
        raise ValueError("13 is refused")
    return 2 * x


def test_concurrent_calls_share_hops_and_keep_their_own_results(thread: StoreThread) -> None:
    calls = Coalesced(thread, slow_double)
    got: dict[int, object] = {}

    async def one(x: int) -> None:
        try:
            got[x] = await calls(x)
        except ValueError as exc:
            got[x] = str(exc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for x in range(40):
                tg.start_soon(one, x)

    anyio.run(main)
    assert got == {x: ("13 is refused" if x == 13 else 2 * x) for x in range(40)}
    assert calls.calls == 40
    assert calls.batches < 10  # the first alone, the rest together


def test_batches_run_in_arrival_order_and_respect_the_limit(thread: StoreThread) -> None:
    seen: list[int] = []
    sizes: list[int] = []
    lock = threading.Lock()

    def record(x: int) -> int:
        with lock:
            seen.append(x)
        time.sleep(0.005)
        return x

    calls = Coalesced(thread, record, limit=5)
    original = calls._run_all

    def sized(args: list[int]) -> list[tuple[int | None, BaseException | None]]:
        sizes.append(len(args))
        return original(args)

    calls._run_all = sized  # type: ignore[method-assign]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for x in range(23):
                tg.start_soon(calls, x)
                await anyio.lowlevel.checkpoint()  # arrival order = start order

    anyio.run(main)
    assert seen == list(range(23))
    assert max(sizes) <= 5 and sum(sizes) == 23


def test_a_cancelled_leader_does_not_strand_the_queue(thread: StoreThread) -> None:
    release = threading.Event()

    def gated(x: int) -> int:
        release.wait(5)
        return x

    calls = Coalesced(thread, gated)
    results: list[int] = []

    async def follower(x: int) -> None:
        results.append(await calls(x))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as leader_scope:
                tg.start_soon(follower, 1)  # leads: its batch is in flight, blocked
                await anyio.sleep(0.05)
                tg.start_soon(follower, 2)
                tg.start_soon(follower, 3)
                await anyio.sleep(0.05)
            leader_scope.cancel()
            tg.cancel_scope.cancel()  # every caller cancelled while its call is queued or running
            release.set()
        # the queued calls still ran (a call cannot be cancelled once queued)

    anyio.run(main)
    assert sorted(results) == [1, 2, 3]
    assert calls._queue == [] and not calls._busy


def test_a_failing_hop_fails_every_call_of_its_batch_and_the_next_batch_still_runs(thread: StoreThread) -> None:
    calls = Coalesced(thread, slow_double)
    boom = {"on": True}
    original = calls.thread

    async def flaky(fn, *args):  # type: ignore[no-untyped-def]
        if boom.pop("on", False):
            raise RuntimeError("the pool is gone")
        return await original(fn, *args)

    calls.thread = flaky  # type: ignore[assignment]
    outcomes: dict[int, object] = {}

    async def one(x: int) -> None:
        try:
            outcomes[x] = await calls(x)
        except RuntimeError as exc:
            outcomes[x] = str(exc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for x in range(5):
                tg.start_soon(one, x)

    anyio.run(main)
    assert outcomes[0] == "the pool is gone"  # the first batch (alone) failed
    assert [outcomes[x] for x in range(1, 5)] == [2, 4, 6, 8]


def test_subsets_make_one_call_per_batch_and_give_each_caller_its_share(thread: StoreThread) -> None:
    made: list[list[str]] = []
    taken = {"a1", "b2", "c1"}

    def claim(ids: list[str]) -> list[str]:
        made.append(list(ids))
        time.sleep(0.01)
        if "boom" in ids:
            raise RuntimeError("refused: boom")
        return sorted(i for i in ids if i in taken)

    calls = CoalescedSubsets(thread, claim)
    got: dict[str, object] = {}

    async def one(name: str, ids: list[str]) -> None:
        try:
            got[name] = await calls(ids)
        except RuntimeError as exc:
            got[name] = str(exc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "first", ["a1"])
            await anyio.sleep(0.002)
            for name, ids in (("b", ["b1", "b2"]), ("c", ["c1"]), ("d", ["d1"])):
                tg.start_soon(one, name, ids)

    anyio.run(main)
    assert got == {"first": ["a1"], "b": ["b2"], "c": ["c1"], "d": []}
    assert made == [["a1"], ["b1", "b2", "c1", "d1"]]  # the three waiting ones in one call

    made.clear()
    got.clear()

    async def failing() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "first", ["a1"])
            await anyio.sleep(0.002)
            tg.start_soon(one, "bad", ["boom"])
            tg.start_soon(one, "good", ["c1"])

    anyio.run(failing)
    # the batch's call failed: each of its callers was tried alone, and only the bad one failed
    assert got == {"first": ["a1"], "bad": "refused: boom", "good": ["c1"]}
