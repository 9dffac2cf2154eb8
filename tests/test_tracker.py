"""The proxy's tracker as scheduler: the proxy seeds each chunk once, the swarm spreads it,
rarest first, within each holder's upload slots; a bad peer is not offered again; chunks the
proxy lacks cross its upstream a few at a time, in order. (The tracker's own logic, driven
directly; test_p2p drives it through real agents and a real proxy.)"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.tracker import SLOW_SEED, Tracker, TrackerError

A, B, C, D = (c * 64 for c in "abcd")
ALL = {"s1", "s2", "s3", "s4"}


def nothing_cached(sha: str) -> bool:
    return False


def everything_cached(sha: str) -> bool:
    return True


def ask(t: Tracker, sid: str, want: list[str], most: int = 1, cached: Any = everything_cached,
        **extra: Any) -> list[tuple[str, str]]:
    grants = t.next(sid, {"want": want, "max": most, **extra}, ALL, cached)["grants"]
    return [(g["sha"], g["peer"]) for g in grants]


def join(t: Tracker, sid: str, port: int, chunks: list[str] | None = None, slots: int = 4) -> None:
    t.announce(sid, f"10.0.0.{sid[-1]}", {"port": port, "chunks": chunks or [], "slots": slots})


def test_the_proxy_seeds_a_chunk_once_and_the_next_agent_waits_for_the_seed() -> None:
    t = Tracker()
    join(t, "s1", 7001)
    join(t, "s2", 7002)
    assert ask(t, "s1", [A]) == [(A, "")]
    assert ask(t, "s2", [A]) == []  # on its way to s1: not sent by the proxy twice
    t.next("s1", {"want": [], "got": [A]}, ALL, everything_cached)
    assert ask(t, "s2", [A]) == [(A, "10.0.0.1:7001")]


def test_a_seed_that_stalls_does_not_hold_up_the_swarm() -> None:
    t = Tracker()
    join(t, "s1", 7001)
    join(t, "s2", 7002)
    assert ask(t, "s1", [A]) == [(A, "")]
    assert ask(t, "s2", [A]) == []
    t.last_grant[A] -= SLOW_SEED + 1  # s1 has not delivered A for longer than a LAN transfer takes
    assert ask(t, "s2", [A], cached=nothing_cached) == []  # still crossing the upstream: that is no stall
    assert ask(t, "s2", [A]) == [(A, "")]


def test_agents_starting_together_are_given_different_chunks_by_the_proxy() -> None:
    t = Tracker()
    for sid in ("s1", "s2", "s3"):
        join(t, sid, 7000)
    first = {sha for sid in ("s1", "s2", "s3") for sha, _ in ask(t, sid, [A, B, C], most=2)}
    assert first == {A, B, C}


def test_the_rarest_chunk_goes_first_from_the_least_busy_holder() -> None:
    t = Tracker()
    join(t, "s1", 7001, [A, B])
    join(t, "s2", 7002, [A])
    join(t, "s3", 7003)
    assert ask(t, "s3", [A, B]) == [(B, "10.0.0.1:7001")]
    assert ask(t, "s3", [A]) == [(A, "10.0.0.2:7002")]  # s1 is serving s3 already


def test_a_holder_serves_at_most_its_slots_at_once() -> None:
    t = Tracker(seed_copies=0)
    join(t, "s1", 7001, [A, B], slots=1)
    join(t, "s2", 7002)
    join(t, "s3", 7003)
    assert ask(t, "s2", [A]) == [(A, "10.0.0.1:7001")]
    assert ask(t, "s3", [A, B]) == []  # s1's one slot is taken, and the proxy does not seed again
    t.next("s2", {"want": [], "got": [A]}, ALL, everything_cached)
    assert ask(t, "s3", [B]) == [(B, "10.0.0.1:7001")]  # the transfer ended: the slot is free


def test_a_peer_that_failed_is_not_offered_again_and_the_proxy_steps_in() -> None:
    t = Tracker()
    join(t, "s1", 7001, [A])
    join(t, "s2", 7002)
    t.seeded[A] = 1  # the proxy gave A to s1 earlier
    assert ask(t, "s2", [A]) == [(A, "10.0.0.1:7001")]
    again = ask(t, "s2", [A], failed=[{"sha": A, "peer": "10.0.0.1:7001"}])
    assert again == [(A, "")]  # nobody else has it: the proxy gives it after all


def test_chunks_the_proxy_lacks_go_upstream_a_few_at_a_time_in_order() -> None:
    t = Tracker(upstream_parallel=2)
    for sid in ("s1", "s2", "s3"):
        join(t, sid, 7000)
    assert ask(t, "s1", [A, B, C, D], most=4, cached=nothing_cached) == [(A, ""), (B, "")]
    assert ask(t, "s2", [A, B, C, D], most=4, cached=nothing_cached) == []
    t.next("s1", {"want": [], "got": [A]}, ALL, nothing_cached)
    assert [sha for sha, _ in ask(t, "s2", [C, D], most=4, cached=nothing_cached)] == [C]


def test_a_session_that_ends_takes_its_chunks_and_grants_with_it() -> None:
    t = Tracker()
    join(t, "s1", 7001, [A])
    join(t, "s2", 7002)
    t.seeded[A] = 1
    assert ask(t, "s2", [A]) == [(A, "10.0.0.1:7001")]
    t.forget("s1")
    assert t.load == {} and A not in t.holders
    assert ask(t, "s2", [A]) == [(A, "")]


def test_chunks_an_agent_drops_are_no_longer_offered() -> None:
    t = Tracker(seed_copies=0)
    join(t, "s1", 7001, [A, B])
    join(t, "s2", 7002)
    t.announce("s1", "10.0.0.1", {"port": 7001, "chunks": [], "dropped": [A]})
    assert ask(t, "s2", [A]) == [(A, "")]  # nobody holds it now: the proxy gives it
    assert ask(t, "s2", [B]) == [(B, "10.0.0.1:7001")]


def test_an_agent_that_serves_nobody_still_gets_chunks_and_ends_its_grants() -> None:
    t = Tracker()
    join(t, "s1", 0)
    assert ask(t, "s1", [A]) == [(A, "")]
    t.next("s1", {"want": [], "got": [A]}, ALL, everything_cached)
    assert t.grants == {} and A not in t.holders


@pytest.mark.parametrize(("body", "message"), [
    ({"want": ["nope"]}, "next 'want' must be a list of SHA-256"),
    ({"want": [A], "max": 0}, "next 'max' must be 1-64"),
    ({"want": [A], "failed": [{"sha": 1}]}, "next 'failed' must be a list"),
    ([A], "next wants"),
])
def test_bad_asks_name_what_is_wrong(body: Any, message: str) -> None:
    with pytest.raises(TrackerError, match=message):
        Tracker().next("s1", body, ALL, everything_cached)
