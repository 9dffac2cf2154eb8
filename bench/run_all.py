"""The fast subset of the scale benchmarks, as JSON: fan-out at 1,000 swarm agents (goal 1),
server memory per idle agent (goal 3) and throughput with persistence (goal 6).

A tool for developers, not a CI gate: compare the output with `bench/compare.py`.

    python bench/run_all.py [--agents 1000] [--out bench/results/latest.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "swarm.json"
        subprocess.run([sys.executable, str(HERE / "swarm.py"), "--agents", str(args.agents), "--rounds", "20",
                        "--idle", "15", "--runs", "10", "--json", str(raw)], check=True)
        swarm = json.loads(raw.read_text())
    tp = swarm["throughput"]
    figures = {
        "agents": swarm["agents"],
        "fanout_p50_s": swarm["fanout_p50_s"],
        "fanout_p99_s": swarm["fanout_p99_s"],
        "master_kib_per_agent": swarm["master_kib_per_agent"],
        "master_idle_cpu_pct": swarm["master_idle_cpu_pct"],
        "dispatch_per_s": tp["dispatch_per_s"],
        "results_per_s": tp["results_per_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {args.out}; compare with: python bench/compare.py {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
