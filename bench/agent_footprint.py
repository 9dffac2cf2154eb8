"""Agent footprint: the memory and CPU of one real, idle and then busy, agent process.

Starts a master and one agent (real processes, default agent settings), waits until it is
online, then measures the agent's RSS, PSS and USS and its CPU (as % of one core) over an idle
window, again while the agent runs `echo hi` at a steady rate (20 tasks/s by default), and
then while it runs a plugin (`file.read` of a small file) at that rate, which brings up its
plugin worker process: the agent and the worker are measured apart and together.
The goal is an idle agent of at most 40 MiB RSS using at most 0.1% of a core. A benchmark,
not a test: run it by hand.

    python bench/agent_footprint.py [--idle-seconds 60] [--busy-seconds 30] [--plugin-seconds 30] [--rate 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from hcsdk.localfleet import LocalFleet as Fleet

MiB = 2**20


def memory(proc: psutil.Process) -> dict[str, float]:
    info = proc.memory_full_info()
    return {"rss_mib": info.rss / MiB, "pss_mib": info.pss / MiB, "uss_mib": info.uss / MiB}


def cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
    """(the process's own CPU seconds, CPU seconds of its children that it has reaped)."""
    t = proc.cpu_times()
    return t.user + t.system, t.children_user + t.children_system


def idle_phase(proc: psutil.Process, seconds: float) -> dict[str, Any]:
    own0, kids0 = cpu_seconds(proc)
    w0 = time.monotonic()
    peak = 0.0
    while (left := w0 + seconds - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        peak = max(peak, proc.memory_info().rss / MiB)
    own1, kids1 = cpu_seconds(proc)
    wall = time.monotonic() - w0
    return {"seconds": wall, "cpu_pct": 100 * (own1 - own0) / wall,
            "children_cpu_pct": 100 * (kids1 - kids0) / wall, "rss_peak_mib": peak, **memory(proc)}


def busy_phase(fleet: Fleet, name: str, proc: psutil.Process, seconds: float, rate: float,
               task: dict[str, Any] | None = None) -> dict[str, Any]:
    client = fleet.client
    runs = []
    own0, kids0 = cpu_seconds(proc)
    w0 = time.monotonic()
    peak = 0.0
    next_sample = w0
    n = 0
    while True:
        due = w0 + n / rate
        if due >= w0 + seconds:
            break
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        runs.append(client.run(targets=name, timeout=60, **(task or {"script": "echo hi"})))
        n += 1
        if time.monotonic() >= next_sample:
            peak = max(peak, proc.memory_info().rss / MiB)
            next_sample += 1.0
    if (wait := w0 + seconds - time.monotonic()) > 0:
        time.sleep(wait)
    own1, kids1 = cpu_seconds(proc)
    wall = time.monotonic() - w0
    mem = memory(proc)
    submit_lag = time.monotonic() - w0 - seconds  # > 0 when the loop could not keep the pace
    statuses: dict[str, int] = {}
    finished: list[float] = []
    for run in runs:
        df = run.to_dataframe()
        for status, fin in zip(df["status"], df["finished_at"], strict=True):
            statuses[status] = statuses.get(status, 0) + 1
            if status == "ok":
                finished.append(fin.timestamp())
    span = max(finished) - min(finished) if len(finished) > 1 else 0.0
    return {"seconds": wall, "tasks": len(runs), "submitted_per_s": len(runs) / wall,
            "completed_per_s": (len(finished) - 1) / span if span else 0.0, "statuses": statuses,
            "submit_lag_s": max(0.0, submit_lag), "cpu_pct": 100 * (own1 - own0) / wall,
            "children_cpu_pct": 100 * (kids1 - kids0) / wall, "rss_peak_mib": max(peak, mem["rss_mib"]), **mem}


def plugin_phase(fleet: Fleet, proc: psutil.Process, seconds: float, rate: float, tmp: Path) -> dict[str, Any]:
    sample = tmp / "sample.txt"
    sample.write_text("a line to read\n" * 64)
    task: dict[str, Any] = {"cmd": "file.read", "args": {"path": str(sample)}}
    fleet.client.run(targets="footprint-1", timeout=60, **task).wait()  # the worker starts here
    worker = next(c for c in proc.children() if "--zy-worker" in c.cmdline())
    w_cpu0 = sum(worker.cpu_times()[:2])
    busy = busy_phase(fleet, "footprint-1", proc, seconds, rate, task)
    wall = busy["seconds"]
    busy["worker_cpu_pct"] = 100 * (sum(worker.cpu_times()[:2]) - w_cpu0) / wall
    busy["worker"] = memory(worker)
    print(f"plugin {wall:.0f}s, {busy['tasks']} file.read tasks ({busy['completed_per_s']:.1f}/s completed, "
          f"{busy['statuses']}): agent RSS {busy['rss_mib']:.1f} MiB, CPU {busy['cpu_pct']:.1f}%; "
          f"worker RSS {busy['worker']['rss_mib']:.1f} MiB (USS {busy['worker']['uss_mib']:.1f}), "
          f"CPU {busy['worker_cpu_pct']:.1f}%; together USS {busy['uss_mib'] + busy['worker']['uss_mib']:.1f} MiB")
    return busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--busy-seconds", type=float, default=30)
    ap.add_argument("--plugin-seconds", type=float, default=30,
                    help="seconds of plugin tasks (file.read, in the worker process) at --rate; 0 skips")
    ap.add_argument("--rate", type=float, default=20, help="tasks per second in the busy phase (default 20)")
    ap.add_argument("--settle", type=float, default=5, help="seconds to wait after the agent is online")
    ap.add_argument("--fast", action="store_true", help="the tests' short heartbeats instead of the defaults")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = ap.parse_args()

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zy-bench-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            fleet.start_master()
            agent = fleet.start_agent("footprint-1", fast=args.fast)
            fleet.wait_online(timeout=60)
            proc = psutil.Process(agent.popen.pid)
            assert "agent" in proc.cmdline(), proc.cmdline()
            time.sleep(args.settle)
            result["startup"] = memory(proc)
            print(f"agent pid {proc.pid} online; RSS {result['startup']['rss_mib']:.1f} MiB")

            idle = result["idle"] = idle_phase(proc, args.idle_seconds)
            print(f"idle {idle['seconds']:.0f}s: RSS {idle['rss_mib']:.1f} MiB (peak {idle['rss_peak_mib']:.1f})  "
                  f"PSS {idle['pss_mib']:.1f} MiB  USS {idle['uss_mib']:.1f} MiB  "
                  f"CPU {idle['cpu_pct']:.3f}% of a core")

            if args.busy_seconds > 0:
                busy = result["busy"] = busy_phase(fleet, "footprint-1", proc, args.busy_seconds, args.rate)
                print(f"busy {busy['seconds']:.0f}s, {busy['tasks']} tasks ({busy['submitted_per_s']:.1f}/s submitted, "
                      f"{busy['completed_per_s']:.1f}/s completed, {busy['statuses']}): "
                      f"RSS {busy['rss_mib']:.1f} MiB (peak {busy['rss_peak_mib']:.1f})  "
                      f"PSS {busy['pss_mib']:.1f} MiB  USS {busy['uss_mib']:.1f} MiB  "
                      f"CPU {busy['cpu_pct']:.1f}% of a core (+{busy['children_cpu_pct']:.1f}% in the commands)")
                if busy["submit_lag_s"] > 1:
                    print(f"  note: submission fell {busy['submit_lag_s']:.1f}s behind the pace")
            if args.plugin_seconds > 0:
                result["plugin"] = plugin_phase(fleet, proc, args.plugin_seconds, args.rate, Path(tmp))
        except BaseException:
            print(fleet.logs())
            raise
        finally:
            fleet.close()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
