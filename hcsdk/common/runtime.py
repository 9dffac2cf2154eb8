"""How the long-running services (master, proxy, agent, swarm) set up the interpreter.

Measured under the swarm benchmark (1,000 agents, fan-out rounds): with CPython's default
collector thresholds (700, 10, 10) the cyclic garbage collector took 16 % of the master's CPU
and 26 % of the swarm's, mostly full collections walking every session's objects (about 100 ms
each) because each message nets a few tracked allocations. These processes free nearly all of
their objects by reference counting; the collector only has to catch the rare cycle, which it
still does, just 70 times less often.
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLDS", "tune_gc"]

#: net tracked allocations before a young collection, then young collections per middle one and
#: middle ones per full one (CPython also waits until a full one would scan 25 % new objects)
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Call once, after start-up imports: what exists now (modules, classes, constants) lives as
    long as the process, so it is moved out of the collector's sight, and the thresholds rise."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
