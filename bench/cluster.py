"""Several masters (issue 15): the same `zy swarm` load on one master on SQLite, one master on
PostgreSQL, and two masters on PostgreSQL, in one run, over real TLS on loopback.

Prints for each configuration:

- fan-out: `echo` to all N, SDK call to complete DataFrame (median, p99; the SDK on the first
  master, with two masters the targets spread over both);
- throughput: runs back to back (bench/swarm.py's), results stored per second;
- CPU per task (us): each master's, and PostgreSQL's (every postgres process of the server);
- on PostgreSQL: bytes per event and per task in the database (``pg_total_relation_size``);

and for two masters:

- a lost wake-up: a run made on one master for an agent the other holds, first result with the
  wake-up delivered, and with the holder's LISTEN backend stopped (SIGSTOP: the NOTIFY never
  arrives, the holder's dispatch sweep finds the task);
- a dead master: the singleton holder SIGKILLed just after a run to every agent started (on the
  other master): when the survivor forgets it, takes the singleton lease and holds every agent,
  and that run completes with every result.

The goals of issue 15 are printed next to the figures. A benchmark, not a test: run it by hand,
alone on the machine (it starts PostgreSQL like tests/pg.py does).

    python bench/cluster.py --agents 1000 [--rounds 10] [--runs 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # swarm.py's pieces; tests' Fleet and PgServer

from pg import PgServer  # noqa: E402
from swarm import fanout, pct, throughput  # noqa: E402

from fleet import Fleet, wait_for  # noqa: E402
from master.store import Store, open_store  # noqa: E402

#: the swarm processes every configuration gets (each N / 2 agents; two processes use both cores)
SWARMS = ("swarm-a", "swarm-b")
GOAL_SCALE = 1.6  # two masters on PG: results/s at least this times one's
GOAL_CPU = 1.3  # master CPU per task on PG within this times SQLite's
GOAL_BACK_S = 30.0  # a dead master's agents all back on the other within this


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children, those it reaped included (postgres forks a
    backend per connection; the postmaster's children_* times keep the exited ones')."""
    proc = psutil.Process(pid)
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:  # reaped meanwhile: now in the parent's children_* times
            pass
    return float(total)


class Config:
    """One configuration: a fleet with one or two masters, the swarms, and what to measure."""

    def __init__(self, name: str, fleet: Fleet, pg: PgServer | None, url: str | None) -> None:
        self.name = name
        self.fleet = fleet
        self.pg = pg
        self.url = url
        self.store: Store | None = open_store(fleet.root, url) if url else None

    def master_pids(self) -> dict[str, int]:
        return {name: m.proc.popen.pid for name, m in self.fleet.masters.items() if m.proc.alive}

    def procs(self) -> dict[str, int]:
        pids = self.master_pids()
        if self.pg is not None:
            pids["postgres"] = self.pg.pid()
        return pids

    def start_swarms(self, n: int, urls: list[str]) -> None:
        for name in SWARMS:
            old = self.fleet.agents.pop(name, None)
            if old is not None:
                old.stop()
        # the old agents offline first, or their sessions count as the new ones
        wait_for(lambda: self.online() == 0, 120, "the previous swarm's agents offline")
        for i, name in enumerate(SWARMS):
            count = n // len(SWARMS) + int(i < n % len(SWARMS))
            self.fleet.start_swarm(count, name, urls=urls)

    def online(self) -> int:
        """Agents held by the live masters (their status: the inventory of 10,000 rows, polled,
        would load the master it measures)."""
        time.sleep(0.5)  # wait_for polls every 0.1 s
        return sum(int(m.client.status()["agents_online"]) for m in self.fleet.masters.values() if m.proc.alive)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.fleet.close()


def wal_bytes(cfg: Config) -> int:
    """PostgreSQL's WAL position (bytes written since the cluster began)."""
    import psycopg

    assert cfg.url is not None
    with psycopg.connect(cfg.url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle (all cores)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def measure(cfg: Config, n: int, rounds: int, runs: int) -> dict[str, Any]:
    """Fan-out rounds then throughput runs, with every server's CPU over both."""
    procs = cfg.procs()
    wal0 = wal_bytes(cfg) if cfg.url else 0
    cpu0 = {name: tree_cpu(pid) for name, pid in procs.items()}
    lat = fanout(cfg.fleet, n, rounds)
    busy0, wall0 = machine_busy(), time.monotonic()
    tp = throughput(cfg.fleet, n, runs) if runs else {"results_per_s": 0.0, "tasks": 0}
    # how many of the machine's cores the throughput runs kept busy (every process: masters,
    # PostgreSQL, the swarms, the SDK): the ceiling two masters on one machine run into
    cores_busy = (machine_busy() - busy0) / max(1e-9, time.monotonic() - wall0)
    tasks = n * (rounds + 1) + int(tp["tasks"])  # the warm-up round too
    per_task = {name: 1e6 * (tree_cpu(pid) - cpu0[name]) / tasks for name, pid in procs.items()}
    fig: dict[str, Any] = {"fanout_p50_s": statistics.median(lat), "fanout_p99_s": pct(lat, 0.99),
                           "results_per_s": tp["results_per_s"], "tasks": tasks,
                           "cpu_us_per_task": per_task, "cores_busy": cores_busy, "cores": psutil.cpu_count()}
    if cfg.url is not None:
        fig["wal_bytes_per_task"] = (wal_bytes(cfg) - wal0) / tasks
    if cfg.store is not None:
        fig["held"] = {m["id"]: m["agents"] for m in cfg.store.masters()}
    return fig


def sizes(cfg: Config) -> dict[str, float]:
    """Bytes per event and per task in PostgreSQL (tables with their indexes and TOAST)."""
    import psycopg

    assert cfg.url is not None
    with psycopg.connect(cfg.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size('events'), (SELECT count(*) FROM events),"
            " pg_total_relation_size('tasks'), (SELECT count(*) FROM tasks), pg_database_size(current_database())"
        ).fetchone()
    assert row is not None
    ev_bytes, events, task_bytes, tasks, db_bytes = (int(v) for v in row)
    return {"events": events, "tasks": tasks, "bytes_per_event": ev_bytes / max(1, events),
            "events_per_task": events / max(1, tasks), "task_row_bytes": task_bytes / max(1, tasks),
            "db_bytes_per_task": db_bytes / max(1, tasks), "db_bytes": db_bytes}


def listen_backend(cfg: Config, master_id: str) -> int:
    """The pid of the postgres backend serving a master's LISTEN connection (wakeups.py names it)."""
    import psycopg

    assert cfg.url is not None
    name = f"zy-wakeups-{master_id}-listen"[:63]
    with psycopg.connect(cfg.url, autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)).fetchone()
    if row is None:
        raise RuntimeError(f"no LISTEN backend named {name!r} in pg_stat_activity")
    return int(row[0])


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    proc = psutil.Process(pid)
    proc.suspend()
    try:
        yield
    finally:
        proc.resume()


def lost_wakeup(cfg: Config, samples: int) -> dict[str, float]:
    """Create-run to DataFrame for one agent held by the other master than the SDK's, with the
    wake-up delivered and with the holder's LISTEN backend stopped (the wake-up lost)."""
    assert cfg.store is not None
    first, other = cfg.fleet.masters["a"], cfg.fleet.masters["b"]
    held = [u for u, (m, _) in cfg.store.session_holders().items() if m == other.master_id]
    assert held, "master b holds no agent"

    def once(uuid: str) -> float:
        t = time.perf_counter()
        df = first.client.run(cmd="echo", args={"text": "w"}, targets=[uuid], timeout=60).to_dataframe()
        took = time.perf_counter() - t
        assert df["status"].tolist() == ["ok"], df
        return took

    delivered = [once(held[i % len(held)]) for i in range(samples)]
    lost = []
    for i in range(samples):
        time.sleep(0.37 * i % 2.0)  # spread the starts over the holder's sweep interval
        with stopped(listen_backend(cfg, other.master_id)):
            lost.append(once(held[(i + samples) % len(held)]))
        time.sleep(1.0)
    return {"delivered_p50_s": statistics.median(delivered), "delivered_max_s": max(delivered),
            "lost_p50_s": statistics.median(lost), "lost_max_s": max(lost),
            "cost_p50_s": statistics.median(lost) - statistics.median(delivered)}


def dead_master(cfg: Config, n: int, dead_after: float) -> dict[str, Any]:
    """SIGKILL the singleton holder just after a run to every agent was made on the other master."""
    assert cfg.store is not None
    store = cfg.store
    ids = {m.master_id: name for name, m in cfg.fleet.masters.items()}
    holder = store.lease_holder("singleton", time.time())
    victim = ids.get(holder or "", "a")
    survivor = next(name for name in cfg.fleet.masters if name != victim)
    vid, sid = cfg.fleet.masters[victim].master_id, cfg.fleet.masters[survivor].master_id
    held_before = sum(1 for m, _ in store.session_holders().values() if m == vid)
    client = cfg.fleet.masters[survivor].client
    # a shell that sleeps keeps every task open across the kill; above 2,000 agents the fork storm
    # would be the figure, and the builtin echo's fan-out alone takes seconds
    shell = n <= 2000
    if shell:
        run = client.run("sleep 2; echo ok-$ZY_TASKID", targets="swarm-*", timeout=180)
    else:
        run = client.run(cmd="echo", args={"text": "ok"}, targets="swarm-*", timeout=180)
    time.sleep(0.5 if shell else 0.2)  # dispatched: the victim's agents are running their tasks
    t0, killed_at = time.monotonic(), time.time()
    cfg.fleet.kill_master(victim)
    marks: dict[str, float] = {}
    checks: dict[str, Callable[[], bool]] = {
        "forgotten_s": lambda: vid not in {m["id"] for m in store.masters()},
        "singleton_s": lambda: store.lease_holder("singleton", time.time()) == sid,
        "agents_back_s": lambda: sum(1 for m, _ in store.session_holders().values() if m == sid) >= n,
    }
    deadline = t0 + 300
    while len(marks) < len(checks) and time.monotonic() < deadline:
        for key, check in checks.items():
            if key not in marks and check():
                marks[key] = time.monotonic() - t0
        time.sleep(0.25)
    df = run.to_dataframe()
    marks["run_done_s"] = time.monotonic() - t0
    want = "ok-" + df["taskid"] + "\n" if shell else "ok\n"
    ok = (df["status"] == "ok") & (df["stdout"] == want)
    killed = pd.Timestamp(killed_at, unit="s", tz="UTC")
    after = int((df["finished_at"] > killed).sum())
    # when the agents finished the last task (their clock = ours): the rest is the masters' delay
    marks["last_finished_s"] = (df["finished_at"].max() - killed).total_seconds()
    return {"victim": victim, "held_by_victim": held_before, "results": len(df), "ok": int(ok.sum()),
            "finished_after_kill": after,
            "unique_agents": int(df["uuid"].nunique()), "lost": n - int(ok.sum()),
            "dead_after_s": dead_after, **{k: marks.get(k, float("nan")) for k in checks}, "run_done_s":
            marks["run_done_s"], "last_finished_s": marks["last_finished_s"]}


def bring_up(cfg: Config, n: int, urls: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    cfg.start_swarms(n, urls)
    wait_for(lambda: cfg.online() >= n, timeout, f"{n} swarm agents online ({cfg.name})")
    took = time.monotonic() - t0
    time.sleep(3)  # enrollment's tail settles
    return took


def report(name: str, fig: dict[str, Any]) -> None:
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in fig["cpu_us_per_task"].items())
    print(f"[{name}] fan-out p50 {fig['fanout_p50_s'] * 1000:.0f} ms, p99 {fig['fanout_p99_s'] * 1000:.0f} ms; "
          f"{fig['results_per_s']:.0f} results/s (machine {fig['cores_busy']:.2f} of {fig['cores']} cores busy); "
          f"CPU us/task: {cpu}", flush=True)
    if "held" in fig:
        print(f"[{name}] agents held: {fig['held']}", flush=True)
    if "size" in fig:
        s = fig["size"]
        print(f"[{name}] PostgreSQL: {s['bytes_per_event']:.0f} B/event, {s['events_per_task']:.1f} events/task, "
              f"{s['task_row_bytes']:.0f} B/task row, {fig['wal_bytes_per_task']:.0f} B of WAL/task, "
              f"{s['db_bytes_per_task']:.0f} B/task for the whole database ({s['db_bytes'] / 2**20:.0f} MiB, "
              f"{s['tasks']} tasks)", flush=True)


def goals(figs: dict[str, Any]) -> list[str]:
    lines = []
    one, two, sq = figs.get("pg1"), figs.get("pg2"), figs.get("sqlite")
    if one and two and one["results_per_s"]:
        ratio = two["results_per_s"] / one["results_per_s"]
        lines.append(f"two masters on PG: {ratio:.2f}x the results/s of one (goal >= {GOAL_SCALE}x): "
                     f"{'met' if ratio >= GOAL_SCALE else 'NOT met'}")
    if one and sq:
        ratio = one["cpu_us_per_task"]["a"] / sq["cpu_us_per_task"]["a"]
        lines.append(f"master CPU per task, one master on PG / on SQLite: {ratio:.2f}x (goal <= {GOAL_CPU}x): "
                     f"{'met' if ratio <= GOAL_CPU else 'NOT met'}")
    if two and "dead" in two:
        d = two["dead"]
        met = d["agents_back_s"] <= GOAL_BACK_S and d["lost"] == 0
        lines.append(f"dead master: all agents back on the other in {d['agents_back_s']:.1f}s, {d['lost']} results "
                     f"lost (goal <= {GOAL_BACK_S:.0f}s, none lost): {'met' if met else 'NOT met'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10, help="fan-out rounds per configuration")
    ap.add_argument("--runs", type=int, default=10, help="runs back to back for results/s (0: skip)")
    ap.add_argument("--wakeup-samples", type=int, default=6, help="runs with and without the wake-up")
    ap.add_argument("--online-timeout", type=float, default=900.0)
    ap.add_argument("--only", choices=["sqlite", "pg1", "pg2"], action="append",
                    help="run only these configurations (pg2 follows pg1 on its store)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the masters and swarms inherit it
    n, only = args.agents, set(args.only or ["sqlite", "pg1", "pg2"])
    figs: dict[str, Any] = {"agents": n, "rounds": args.rounds, "runs": args.runs}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zy-cluster-") as tmp:
        if "sqlite" in only:
            cfg = Config("sqlite", Fleet(Path(tmp) / "sqlite"), None, None)
            try:
                cfg.fleet.start_master()
                online = bring_up(cfg, n, [cfg.fleet.url], args.online_timeout)
                figs["sqlite"] = fig = {"online_s": online, **measure(cfg, n, args.rounds, args.runs)}
                report("one master, SQLite", fig)
            finally:
                cfg.close()
        if only & {"pg1", "pg2"}:
            figs.update(run_pg(Path(tmp), n, args, only))
    figs["wall_s"] = time.monotonic() - started
    figs["goals"] = goals(figs)
    print("\ngoals (issue 15):", *figs["goals"], sep="\n  ")
    print(f"total {figs['wall_s']:.0f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figs, indent=2))


def run_pg(tmp: Path, n: int, args: argparse.Namespace, only: set[str]) -> dict[str, Any]:
    """One master on PostgreSQL, then a second on the same store (the agents stay enrolled)."""
    figs: dict[str, Any] = {}
    pg = PgServer().start()
    cfg: Config | None = None
    try:
        url = pg.new_database("bench")
        cfg = Config("pg", Fleet(tmp / "pg", store=url), pg, url)
        cfg.fleet.start_master()
        online = bring_up(cfg, n, [cfg.fleet.url], args.online_timeout)
        if "pg1" in only:
            figs["pg1"] = fig = {"online_s": online, **measure(cfg, n, args.rounds, args.runs), "size": sizes(cfg)}
            report("one master, PostgreSQL", fig)
        if "pg2" in only:
            cfg.fleet.start_master(name="b")
            urls = [cfg.fleet.masters["a"].url, cfg.fleet.masters["b"].url]
            online = bring_up(cfg, n, urls, args.online_timeout)  # the same agents, now over both
            figs["pg2"] = fig = {"online_s": online, **measure(cfg, n, args.rounds, args.runs), "size": sizes(cfg)}
            report("two masters, PostgreSQL", fig)
            fig["wakeup"] = w = lost_wakeup(cfg, args.wakeup_samples)
            print(f"[two masters] run on a for an agent on b: first result p50 {w['delivered_p50_s'] * 1000:.0f} ms "
                  f"with the wake-up, {w['lost_p50_s'] * 1000:.0f} ms (max {w['lost_max_s'] * 1000:.0f}) with it "
                  f"lost: a lost wake-up costs {w['cost_p50_s'] * 1000:.0f} ms at the median (bounded by the "
                  "dispatch sweep, 2 s)", flush=True)
            fig["dead"] = d = dead_master(cfg, n, 10.0)
            print(f"[two masters] SIGKILL of master {d['victim']} (singleton, {d['held_by_victim']} agents): "
                  f"forgotten after {d['forgotten_s']:.1f}s, singleton moved after {d['singleton_s']:.1f}s, all "
                  f"agents on the other after {d['agents_back_s']:.1f}s; the run begun before the kill: "
                  f"{d['ok']}/{n} ok after {d['run_done_s']:.1f}s (the last finished on its agent after "
                  f"{d['last_finished_s']:.1f}s), {d['finished_after_kill']} of them after the kill "
                  f"({d['lost']} lost)", flush=True)
    finally:
        if cfg is not None:
            cfg.close()
        pg.remove()
    return figs


if __name__ == "__main__":
    main()
