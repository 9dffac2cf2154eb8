"""The fast subset of the scale benchmarks, as JSON: fan-out at 1,000 swarm agents, master CPU per
task, server memory per idle agent and throughput with persistence (bench/swarm.py), and with
--quick also the agent's CPU per shell task (bench/agent_footprint.py) and 50 real agents against
ipyparallel's 50 engines (bench/peers/ipyparallel.py), in one run.

A tool for developers, not a CI gate: compare the output with `bench/compare.py`.

    python bench/run_all.py [--agents 1000] [--out bench/results/latest.json]
    python bench/run_all.py --quick --json FILE      # under five minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _run_json(argv: list[str], out: Path) -> Any:
    """Run one benchmark script with `--json out` and return what it wrote."""
    subprocess.run([sys.executable, *argv, "--json", str(out)], check=True)
    return json.loads(out.read_text())


def swarm_figures(tmp: Path, agents: int, quick: bool) -> dict[str, Any]:
    rounds, idle, runs = ("10", "8", "5") if quick else ("20", "15", "10")
    swarm = _run_json([str(HERE / "swarm.py"), "--agents", str(agents), "--rounds", rounds, "--idle", idle,
                       "--runs", runs], tmp / "swarm.json")
    tp = swarm["throughput"]
    figures = {
        "agents": swarm["agents"],
        "fanout_p50_s": swarm["fanout_p50_s"],
        "fanout_p99_s": swarm["fanout_p99_s"],
        "master_kib_per_agent": swarm["master_kib_per_agent"],
        "master_idle_cpu_pct": swarm["master_idle_cpu_pct"],
        "master_cpu_us_per_task": swarm["cpu_us_per_task"]["master"],
        "dispatch_per_s": tp["dispatch_per_s"],
        "results_per_s": tp["results_per_s"],
    }
    # the keys issue 16 names carry the agent count they were measured at
    for key in ("master_cpu_us_per_task", "fanout_p99_s", "results_per_s", "master_kib_per_agent"):
        figures[f"{key}_{agents}"] = figures[key]
    return figures


def agent_figures(tmp: Path) -> dict[str, Any]:
    """One real agent running `echo hi` shells at 20/s: its own CPU per task (the shells apart)."""
    fp = _run_json([str(HERE / "agent_footprint.py"), "--idle-seconds", "5", "--busy-seconds", "20",
                    "--plugin-seconds", "0", "--settle", "2"], tmp / "agent.json")
    busy = fp["busy"]
    ms_per_task = 10 * busy["cpu_pct"] / busy["completed_per_s"]  # % of a core -> ms per second per task
    return {"agent_cpu_ms_per_shell_task": ms_per_task, "agent_idle_rss_mib": fp["idle"]["rss_mib"]}


def peer_figures(tmp: Path) -> dict[str, Any]:
    ipp = _run_json([str(HERE / "peers" / "ipyparallel.py"), "--n", "50"], tmp / "ipp.json")
    r = ipp["results"]["50"]
    return {"hcsdk_s_50": r["hcsdk"]["client_run"]["median_s"],
            "ipyparallel_s_50": r["ipyparallel"]["apply_sync"]["median_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds, plus the agent's CPU per shell task and ipyparallel at N = 50")
    ap.add_argument("--out", "--json", dest="out", type=Path, default=HERE / "results" / "latest.json",
                    help="write the figures here (default bench/results/latest.json)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        figures = swarm_figures(tmp, args.agents, args.quick)
        if args.quick:
            figures.update(agent_figures(tmp))
            figures.update(peer_figures(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {args.out}; compare with: python bench/compare.py {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
