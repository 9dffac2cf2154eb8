"""Coalesced store calls (master/store/offload.py): calls made while one is in flight go
together in one worker-thread hop, each with its own result or exception, and a cancelled
caller never strands the calls queued behind it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

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


def call_all(calls: Coalesced[Any, Any], items: list[tuple[object, Any]], lead: bool = False) -> dict[object, object]:
    """Each ``(key, arg)`` called at once (with ``lead``, the first one alone, then the rest while
    it is in flight): key -> its result, or its exception's text."""
    got: dict[object, object] = {}

    async def one(key: object, arg: Any) -> None:
        try:
            got[key] = await calls(arg)
        except Exception as exc:
            got[key] = str(exc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i, (key, arg) in enumerate(items):
                tg.start_soon(one, key, arg)
                if lead and i == 0:
                    await anyio.sleep(0.002)

    anyio.run(main)
    return got


def test_concurrent_calls_share_hops_and_keep_their_own_results(thread: StoreThread) -> None:
    calls = Coalesced(thread, slow_double)
    got = call_all(calls, [(x, x) for x in range(40)])
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
    outcomes = call_all(calls, [(x, x) for x in range(5)])
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
    got = call_all(calls, [("first", ["a1"]), ("b", ["b1", "b2"]), ("c", ["c1"]), ("d", ["d1"])], lead=True)
    assert got == {"first": ["a1"], "b": ["b2"], "c": ["c1"], "d": []}
    assert made == [["a1"], ["b1", "b2", "c1", "d1"]]  # the three waiting ones in one call

    made.clear()
    got = call_all(calls, [("first", ["a1"]), ("bad", ["boom"]), ("good", ["c1"])], lead=True)
    # the batch's call failed: each of its callers was tried alone, and only the bad one failed
    assert got == {"first": ["a1"], "bad": "refused: boom", "good": ["c1"]}
