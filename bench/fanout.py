"""Fan-out latency: a master and N real agent processes; `echo hi` on all of them, R times.

Prints the median and p95 latency from `Client.run()` to the complete DataFrame, plus the
resident memory of the master and of one agent. A benchmark, not a test: run it by hand.

    python bench/fanout.py [--agents 20] [--rounds 10] [--no-http2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from hcsdk.localfleet import LocalFleet as Fleet


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-http2", action="store_true", help="master refuses h2: agents poll over HTTP/1.1")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="zy-bench-") as tmp:
        fleet = Fleet(Path(tmp), ["--no-http2"] if args.no_http2 else [])
        try:
            fleet.start_master()
            for i in range(args.agents):
                fleet.start_agent(f"bench-{i:04d}")
            t0 = time.perf_counter()
            fleet.wait_online(timeout=120)
            print(f"{args.agents} agents online in {time.perf_counter() - t0:.1f}s "
                  f"({'HTTP/1.1 polling' if args.no_http2 else 'HTTP/2 channel'})")
            client = fleet.client
            client.run("echo warm-up", targets="bench-*", timeout=60).to_dataframe()
            latencies = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                df = client.run("echo hi", targets="bench-*", timeout=60).to_dataframe()
                latencies.append(time.perf_counter() - t)
                assert (df["status"] == "ok").all() and len(df) == args.agents, df["status"].value_counts()
            latencies.sort()
            p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
            print(f"fan-out of `echo hi` to {args.agents} agents, {args.rounds} rounds:")
            print(f"  median {statistics.median(latencies) * 1000:.0f} ms   p95 {p95 * 1000:.0f} ms   "
                  f"min {latencies[0] * 1000:.0f} ms   max {latencies[-1] * 1000:.0f} ms")
            assert fleet.master is not None
            one = next(iter(fleet.agents.values()))
            print(f"  master RSS {rss_mib(fleet.master.popen.pid):.1f} MiB   "
                  f"one agent RSS {rss_mib(one.popen.pid):.1f} MiB")
        finally:
            fleet.close()


if __name__ == "__main__":
    main()
