"""Relay cost: the same agents fanned out to directly and through one proxy, in one run.

Starts a master and N agent processes connected directly, fans out `echo hi` R times, then
restarts the agents behind one proxy and does the same. Prints median/p95 latency of each,
the messages the proxy relayed per second during the fan-outs, and the proxy's CPU and memory.

    python bench/relay.py [--agents 50] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from hcsdk.localfleet import LocalFleet


def fanout(fleet: LocalFleet, targets: str, rounds: int, expected: int) -> list[float]:
    fleet.client.run("echo warm-up", targets=targets, timeout=60).to_dataframe()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        df = fleet.client.run("echo hi", targets=targets, timeout=60).to_dataframe()
        out.append(time.perf_counter() - t)
        assert len(df) == expected and (df["status"] == "ok").all(), df["status"].value_counts()
    return sorted(out)


def show(label: str, lat: list[float]) -> None:
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    print(f"  {label:<14} median {statistics.median(lat) * 1000:6.0f} ms   p95 {p95 * 1000:6.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    n = args.agents
    with tempfile.TemporaryDirectory(prefix="zy-relay-") as tmp, LocalFleet(Path(tmp)) as fleet:
        fleet.start_master()
        names = [f"d-{i:03d}" for i in range(n)]
        for name in names:
            fleet.start_agent(name, fast=False)
        fleet.wait_online(*names, timeout=180)
        direct = fanout(fleet, "d-*", args.rounds, n)
        for name in names:
            fleet.agents.pop(name).stop()

        url = fleet.start_proxy("relay")
        relayed_names = [f"p-{i:03d}" for i in range(n)]
        for name in relayed_names:
            fleet.start_agent(name, extra=["--master", url], fast=False)
        fleet.wait_online(*relayed_names, timeout=180)
        proxy = psutil.Process(fleet.agents["relay"].popen.pid)
        cpu0, t0 = proxy.cpu_times(), time.perf_counter()
        relayed = fanout(fleet, "p-*", args.rounds, n)
        cpu1, t1 = proxy.cpu_times(), time.perf_counter()
        busy = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
        # per target and round: a task down, start/out/done up, acks down (coalesced per batch)
        messages = (args.rounds + 1) * n * 5
        print(f"fan-out of `echo hi` to {n} agents, {args.rounds} rounds each:")
        show("direct", direct)
        show("via one proxy", relayed)
        print(f"  proxy relayed ~{messages / (t1 - t0):,.0f} messages/s during the fan-outs, "
              f"at {busy * 100:.0f}% of a core; proxy RSS {proxy.memory_info().rss / 2**20:.1f} MiB "
              f"for {n} agents")


if __name__ == "__main__":
    main()
