"""Scale: a master (optionally behind one proxy) and `zy swarm` agents, measured.

Prints, for N swarm agents on this machine:

- time for all N to come online (enrollment included on a first run);
- idle cost: master (and proxy) CPU as % of one core, and server memory per connected agent;
- fan-out: `echo` to all N, SDK call to complete DataFrame (median, p99, max over rounds);
- throughput: runs back to back, dispatches/s and results stored/s (with persistence);
- reconnect storm (--storm): the master (or proxy) killed and restarted under N agents: time
  until all are back, and the SDK's latency (GET status) while they come back.

A benchmark, not a test: run it by hand.

    python bench/swarm.py --agents 1000 [--rounds 20] [--idle 30] [--via-proxy] [--storm] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

from hcsdk import AsyncClient
from hcsdk.localfleet import LocalFleet, Proc, wait_for


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_kib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1024


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def online(fleet: LocalFleet) -> int:
    return int(fleet.client.status()["agents_online"])


def idle_cost(procs: dict[str, int], seconds: float) -> dict[str, float]:
    before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {name: 100 * (cpu_seconds(pid) - before[name]) / wall for name, pid in procs.items()}


def fanout(fleet: LocalFleet, n: int, rounds: int, targets: str = "swarm-*") -> list[float]:
    echo: dict[str, Any] = {"cmd": "echo", "args": {"text": "hi"}, "targets": targets, "timeout": 60}
    fleet.client.run(**echo).to_dataframe()  # warm-up
    latencies = []
    for _ in range(rounds):
        t = time.perf_counter()
        df = fleet.client.run(**echo).to_dataframe()
        latencies.append(time.perf_counter() - t)
        bad = df[df["status"] != "ok"]
        assert len(df) == n and bad.empty, bad[["hostname", "status", "error"]].head()
    return latencies


def curve(fleet: LocalFleet, n: int, rounds: int) -> dict[int, dict[str, float]]:
    """Fan-out latency against N: subsets of the swarm picked by glob (swarm-0000? is 10)."""
    points = {}
    for digits in range(1, 6):
        size = 10**digits
        if size > n:
            break
        lat = fanout(fleet, size, rounds, "swarm-" + "0" * (5 - digits) + "?" * digits)
        points[size] = {"p50_s": statistics.median(lat), "p99_s": pct(lat, 0.99)}
        print(f"  N={size:>6}: median {points[size]['p50_s'] * 1000:.0f} ms, p99 {points[size]['p99_s'] * 1000:.0f} ms",
              flush=True)
    return points


def plot(points: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(sizes, [points[s]["p50_s"] for s in sizes], "o-", label="median")
    ax.plot(sizes, [points[s]["p99_s"] for s in sizes], "s--", label="p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("agents (zy swarm, one process)")
    ax.set_ylabel("SDK call to complete DataFrame (s)")
    ax.set_title("fan-out of echo, master and swarm on one 2-core machine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def throughput(fleet: LocalFleet, n: int, runs: int) -> dict[str, float]:
    """``runs`` runs to all N at once: dispatch rate (tasks stored and sent per second of
    create-run calls) and ingest rate (results stored per second, start to last result)."""
    stats0 = fleet.client.status()

    async def go() -> tuple[float, float]:
        async with AsyncClient(fleet.url, token=fleet.admin_token, ca=str(fleet.root / "master" / "ca.pem")) as c:
            t0 = time.perf_counter()
            handles = [await c.run(cmd="echo", args={"text": "x"}, targets="swarm-*", timeout=120) for _ in range(runs)]
            created = time.perf_counter() - t0
            for h in handles:
                df = await h.to_dataframe()
                assert (df["status"] == "ok").all(), df["status"].value_counts()
            return created, time.perf_counter() - t0

    created, total = anyio.run(go)
    stats1 = fleet.client.status()
    tasks = n * runs
    return {"tasks": tasks, "dispatch_per_s": tasks / created, "results_per_s": tasks / total,
            "messages_stored": stats1["ingested"] - stats0["ingested"],
            "messages_stored_per_s": (stats1["ingested"] - stats0["ingested"]) / total}


def storm(fleet: LocalFleet, n: int, restart: Any, timeout: float) -> dict[str, float]:
    """Kill and restart a server under N agents; probe the SDK API while they come back."""
    probes: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                fleet.client.status()
                probes.append(time.perf_counter() - t)
            except Exception:  # the master itself is restarting
                pass
            time.sleep(0.1)

    t0 = time.monotonic()
    restart()
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    wait_for(lambda: online(fleet) >= n, timeout, f"{n} agents back online")
    back = time.monotonic() - t0
    stop.set()
    thread.join()
    return {"all_back_s": back, "api_p50_ms": 1000 * statistics.median(probes) if probes else -1,
            "api_p99_ms": 1000 * pct(probes, 0.99) if probes else -1, "api_probes": len(probes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds to measure the idle cost over")
    ap.add_argument("--runs", type=int, default=10, help="runs for the throughput figure (0: skip)")
    ap.add_argument("--via-proxy", action="store_true", help="the swarm connects through one proxy")
    ap.add_argument("--storm", action="store_true", help="also kill and restart the master (or the proxy)")
    ap.add_argument("--online-timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--curve", action="store_true", help="also fan out to 10, 100, 1000... of the agents")
    ap.add_argument("--plot", type=Path, help="with --curve: draw latency against N into this PNG")
    ap.add_argument("--root", type=Path, help="keep the master's data and the swarm's identities here, so a "
                    "second run skips enrollment (default: a temporary folder)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the master and proxy inherit it
    n = args.agents
    figures: dict[str, Any] = {"agents": n, "via_proxy": args.via_proxy}

    with tempfile.TemporaryDirectory(prefix="zy-swarm-") as tmp:
        fleet = LocalFleet(args.root or Path(tmp))
        try:
            fleet.start_master()
            urls = [fleet.start_proxy("proxy-1")] if args.via_proxy else [fleet.url]
            time.sleep(2)
            servers = {"master": fleet.master.popen.pid}  # type: ignore[union-attr]
            if args.via_proxy:
                servers["proxy"] = fleet.agents["proxy-1"].popen.pid
            base = {name: rss_kib(pid) for name, pid in servers.items()}
            t0 = time.monotonic()
            swarm: Proc = fleet.start_swarm(n, urls=urls)
            wait_for(lambda: online(fleet) >= n + args.via_proxy, args.online_timeout, f"{n} agents online")
            figures["online_s"] = time.monotonic() - t0
            print(f"{n} swarm agents online in {figures['online_s']:.1f}s (enrollment included)", flush=True)

            time.sleep(5)
            cpu = idle_cost({**servers, "swarm": swarm.popen.pid}, args.idle)
            for name, pid in servers.items():
                figures[f"{name}_idle_cpu_pct"] = cpu[name]
                figures[f"{name}_kib_per_agent"] = (rss_kib(pid) - base[name]) / n
                figures[f"{name}_rss_mib"] = rss_kib(pid) / 1024
            figures["swarm_idle_cpu_pct"] = cpu["swarm"]
            figures["swarm_rss_mib"] = rss_kib(swarm.popen.pid) / 1024
            print(f"idle over {args.idle:.0f}s: " + ", ".join(
                f"{name} {cpu[name]:.1f}% CPU, {figures[f'{name}_kib_per_agent']:.1f} KiB/agent "
                f"({figures[f'{name}_rss_mib']:.0f} MiB)" for name in servers) +
                f"; swarm {cpu['swarm']:.1f}% CPU, {figures['swarm_rss_mib']:.0f} MiB", flush=True)

            procs = {**servers, "swarm": swarm.popen.pid}
            cpu0 = {name: cpu_seconds(pid) for name, pid in procs.items()}
            lat = fanout(fleet, n, args.rounds)
            tasks = n * (args.rounds + 1)  # with the warm-up
            per_task = {name: 1e6 * (cpu_seconds(pid) - cpu0[name]) / tasks for name, pid in procs.items()}
            figures.update(fanout_p50_s=statistics.median(lat), fanout_p99_s=pct(lat, 0.99), fanout_max_s=max(lat),
                           cpu_us_per_task=per_task)
            print(f"fan-out echo to {n}, {args.rounds} rounds: median {figures['fanout_p50_s'] * 1000:.0f} ms, "
                  f"p99 {figures['fanout_p99_s'] * 1000:.0f} ms, max {figures['fanout_max_s'] * 1000:.0f} ms; CPU per "
                  "task: " + ", ".join(f"{name} {us:.0f} us" for name, us in per_task.items()), flush=True)

            if args.curve:
                print("fan-out against N:", flush=True)
                figures["curve"] = points = curve(fleet, n, args.rounds)
                if args.plot:
                    plot(points, args.plot)

            if args.runs:
                tp = throughput(fleet, n, args.runs)
                figures["throughput"] = tp
                print(f"throughput, {args.runs} runs x {n}: {tp['dispatch_per_s']:.0f} dispatches/s, "
                      f"{tp['results_per_s']:.0f} results/s ({tp['messages_stored_per_s']:.0f} messages "
                      "stored/s)", flush=True)

            if args.storm:
                def restart() -> None:
                    if args.via_proxy:
                        proc = fleet.agents.pop("proxy-1")
                        proc.kill()
                        proc.stop()
                        port = int(urls[0].rsplit(":", 1)[1])
                        fleet.start_proxy("proxy-1", port=port)
                    else:
                        fleet.restart_master(kill=True)
                figures["storm"] = st = storm(fleet, n + args.via_proxy, restart, args.online_timeout)
                print(f"storm ({'proxy' if args.via_proxy else 'master'} killed and restarted): all {n} back in "
                      f"{st['all_back_s']:.1f}s; SDK status p50 {st['api_p50_ms']:.0f} ms, "
                      f"p99 {st['api_p99_ms']:.0f} ms over {st['api_probes']} calls", flush=True)
        finally:
            fleet.close()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
