"""Online update of a fleet: how long batches take, and what commands see while agents hand over.

Starts a master and N real agent processes, builds the zipapp agent with another version, and
updates all agents in batches while a probe sends `echo` to every agent a few times a second.
Prints the time per batch and per agent, and the probe's latency before and during the update
(the handover holds new commands for the moment the new build takes to connect). Every probe
must come back ok. A benchmark, not a test: run it by hand.

    python bench/update.py [--agents 10] [--batch-size 5] [--probe-rate 4]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hcsdk.localfleet import LocalFleet

ROOT = Path(__file__).resolve().parents[1]


def probe(fleet: LocalFleet, rate: float, stop: threading.Event, out: list[tuple[float, Any]]) -> None:
    while not stop.is_set():
        out.append((time.time(), fleet.client.run(cmd="echo", args={"text": "p"}, targets="upd-*", timeout=120)))
        time.sleep(1 / rate)


def latencies(runs: list[tuple[float, Any]], start: float, end: float) -> tuple[list[float], int]:
    """Fan-out latencies (first send to last result) of probes sent in [start, end); failures."""
    lat, bad = [], 0
    for sent, run in runs:
        if not start <= sent < end:
            continue
        df = run.to_dataframe()
        bad += int((df["status"] != "ok").sum()) + int((df["stdout"] != "p\n").sum())
        lat.append(df["finished_at"].max().timestamp() - sent)
    return lat, bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--probe-rate", type=float, default=4, help="probe fan-outs per second (default 4)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="zy-bench-update-") as tmp:
        build = Path(tmp) / "dist" / "zy-agent.pyz"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_agent.py"), "--only", "pyz", "--version",
                        "99.0.0+bench", "--out", str(build.parent)], check=True, capture_output=True)
        fleet = LocalFleet(Path(tmp) / "fleet")
        try:
            fleet.start_master()
            for i in range(args.agents):
                fleet.start_agent(f"upd-{i:02d}")
            fleet.wait_online(timeout=120)
            runs: list[tuple[float, Any]] = []
            stop = threading.Event()
            prober = threading.Thread(target=probe, args=(fleet, args.probe_rate, stop, runs), daemon=True)
            prober.start()
            time.sleep(5)
            t0 = time.time()
            df = fleet.client.agents.update("upd-*", build=build, batch_size=args.batch_size)
            t1 = time.time()
            time.sleep(5)
            stop.set()
            prober.join()
            before, bad_before = latencies(runs, 0, t0)
            during, bad_during = latencies(runs, t0, t1)
            after, bad_after = latencies(runs, t1, 1e12)
        except BaseException:
            print(fleet.logs())
            raise
        finally:
            fleet.close()
            subprocess.run(["pkill", "-9", "-f", str(Path(tmp) / "fleet")], check=False)

    print(f"updated {args.agents} agents in batches of {args.batch_size}: {t1 - t0:.1f} s in all; "
          f"statuses {df['status'].value_counts().to_dict()}, versions after {sorted(set(df['version_after']))}")
    for batch, rows in df.groupby("batch"):
        print(f"  batch {batch}: {len(rows)} agents, {rows['duration_s'].max():.2f} s")
    for name, lat, bad in (("before", before, bad_before), ("during", during, bad_during),
                           ("after", after, bad_after)):
        if lat:
            median = statistics.median(lat) * 1000
            print(f"probe {name:6s}: {len(lat)} fan-outs to {args.agents}, median {median:.0f} ms, "
                  f"max {max(lat) * 1000:.0f} ms, {bad} not ok")


if __name__ == "__main__":
    main()
