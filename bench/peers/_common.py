"""Shared helpers for the peer comparisons in this folder (not a script; see README.md).

- `peer_venv`: a virtualenv with a peer tool installed, cached under ~/.cache/hcsdk-bench/peers/
- `median_of`: warm up once, then the median of 5 timed calls
- `memory` / `tree_memory`: RSS and PSS (from /proc/PID/smaps_rollup) of a process or a process tree
- `OtherLoad` / `wait_quiet`: how much CPU other processes took while we timed (a shared machine), wait for quiet
- `Reaper`: every process started here, killed by process group at exit, on an error or on Ctrl-C
- `hcsdk_fleet` / `time_hcsdk` / `run_hcsdk`: a local hcsdk fleet of N real agent processes, `client.run` timed on
  it, and where the CPU went (`cpu_seconds`)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPEATS = 5
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hcsdk-bench" / "peers"
MIB = 2**20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- virtualenvs ----------------------------------------------------------------------------------


def peer_venv(name: str, requirements: Sequence[str], dist: str) -> tuple[Path, str]:
    """A venv with ``requirements`` installed; returns (its python, the installed version of ``dist``).

    Cached in CACHE/<name>-py<X.Y>-<hash of the requirements>: a rerun reuses it, a change of the
    requirements (or of the interpreter) builds another. A build that did not finish has no
    ``ready.json`` and is redone. Set HCSDK_BENCH_REBUILD=1 to rebuild anyway."""
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    root = CACHE / f"{name}-py{sys.version_info.major}.{sys.version_info.minor}-{key}"
    python, ready = root / "bin" / "python", root / "ready.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        if ready.exists() and python.exists() and not os.environ.get("HCSDK_BENCH_REBUILD"):
            version = str(json.loads(ready.read_text())["version"])
            log(f"{name}: cached venv {root} ({dist} {version})")
            return python, version
        shutil.rmtree(root, ignore_errors=True)
        log(f"{name}: building venv {root}: pip install {' '.join(requirements)}")
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
                             capture_output=True, text=True)
        if pip.returncode:  # its output only when it failed: pip's warnings about local indexes are noise here
            output = f"{pip.stdout[-3000:]}\n{pip.stderr[-3000:]}"
            raise RuntimeError(f"pip install {' '.join(requirements)} failed:\n{output}")
        version = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        ready.write_text(json.dumps({"version": version, "requirements": list(requirements)}))
        log(f"{name}: venv ready in {time.monotonic() - t0:.0f}s ({dist} {version})")
        return python, version


# -- timing -----------------------------------------------------------------------------------------


@dataclass
class Timing:
    median: float
    samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": round(self.median, 4), "samples_s": [round(s, 4) for s in self.samples]}


def median_of(fn: Callable[[], object], repeats: int = REPEATS) -> Timing:
    """Call ``fn`` once to warm up, then ``repeats`` times timed; the median and every sample."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), samples)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# -- memory -----------------------------------------------------------------------------------------


def memory(pid: int) -> dict[str, float | None]:
    """RSS and PSS (None where smaps_rollup cannot be read) of one process, in MiB."""
    rss = psutil.Process(pid).memory_info().rss / MIB
    pss: float | None = None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024 / MIB
    return {"rss_mib": round(rss, 1), "pss_mib": None if pss is None else round(pss, 1)}


def tree_memory(pid: int) -> dict[str, Any]:
    """The process, and the sum over it and all its descendants (PSS adds up; RSS counts shared pages twice)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    parts = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            parts.append({"pid": proc.pid, "name": " ".join(proc.cmdline())[:80], **memory(proc.pid)})
    total_rss = sum(p["rss_mib"] for p in parts)
    total_pss = sum(p["pss_mib"] for p in parts) if all(p["pss_mib"] is not None for p in parts) else None
    return {"main": memory(pid), "processes": len(parts), "tree_rss_mib": round(total_rss, 1),
            "tree_pss_mib": None if total_pss is None else round(total_pss, 1), "parts": parts}


def fmt_mem(m: dict[str, Any]) -> str:
    main = m["main"]
    pss = f" / PSS {main['pss_mib']:.0f}" if main["pss_mib"] is not None else ""
    text = f"RSS {main['rss_mib']:.0f}{pss} MiB"
    if m["processes"] > 1:
        tree_pss = f" / PSS {m['tree_pss_mib']:.0f}" if m["tree_pss_mib"] is not None else ""
        text += f" (with its {m['processes'] - 1} child process(es): RSS {m['tree_rss_mib']:.0f}{tree_pss} MiB)"
    return text


# -- other load on the machine ---------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, from /proc/stat)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


def _our_seconds() -> float:
    """CPU seconds used by this process and its descendants, including the ones already reaped (their time is in
    their parent's children_user/children_system)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class OtherLoad:
    """How much CPU other processes (another user's tests, say) used while a block ran, in % of one core:
    ``with OtherLoad() as load: ...`` then ``load.pct``. The machine's busy time less this process tree's, so
    short-lived processes count too. Tells whether a timing shared the machine."""

    def __enter__(self) -> OtherLoad:
        self.pct: float | None = None
        self._busy, self._ours, self._t0 = _busy_seconds(), _our_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self._t0
        other = (_busy_seconds() - self._busy) - (_our_seconds() - self._ours)
        self.pct = round(max(0.0, 100.0 * other / elapsed), 1) if elapsed > 0 else None


def wait_quiet(max_wait: float, threshold: float = 10.0, window: float = 5.0) -> None:
    """Wait up to ``max_wait`` seconds until other processes use under ``threshold``% of a core (over ``window``)."""
    if max_wait <= 0:
        return
    deadline = time.monotonic() + max_wait
    while True:
        with OtherLoad() as load:
            time.sleep(window)
        if (load.pct or 0) < threshold:
            return
        if time.monotonic() >= deadline:
            log(f"machine still busy (other processes: {load.pct:.0f}% of a core); going on")
            return
        log(f"waiting for a quiet machine: other processes use {load.pct:.0f}% of a core")


# -- processes --------------------------------------------------------------------------------------


class Reaper:
    """Every process started through it runs in its own session (so its own process group); ``reap``
    kills those groups and any descendant that left them: SIGTERM, a grace period, then SIGKILL.
    Registered with atexit; SIGTERM and SIGHUP are turned into SystemExit so try/finally blocks run."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.every_pid: set[int] = set()  # every process this run started (group leaders), for check_gone
        atexit.register(self.reap)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    @staticmethod
    def _on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    def popen(self, argv: Sequence[str | Path], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as fh:
            proc = subprocess.Popen([str(a) for a in argv], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.adopt(proc)
        return proc

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """Also kill this process (started by someone else, in its own session) and its group."""
        self.procs.append(proc)
        self.every_pid.add(proc.pid)

    def check_gone(self) -> None:
        """Warn about any process still in one of the process groups this run started."""
        left = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(proc.pid) in self.every_pid and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:100]}")
        if left:
            log(f"WARNING: {len(left)} process(es) started by this run still alive:\n  " + "\n  ".join(left[:20]))
        else:
            log(f"all {len(self.every_pid)} process groups started by this run are gone")

    def reap(self, only: Sequence[subprocess.Popen[bytes]] | None = None, grace: float = 5.0) -> None:
        """Kill the process groups (and stray descendants) of ``only``, or of everything started here."""
        procs = list(self.procs if only is None else only)
        leaders = [p.pid for p in procs]
        victims = _descendants([p.pid for p in procs if p.poll() is None])
        for pgid in leaders:  # a group can outlive its leader (salt's job processes): kill it all the same
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGTERM)
        _, alive = psutil.wait_procs(victims, timeout=grace)
        for pgid in leaders:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        for victim in alive:
            with contextlib.suppress(psutil.Error):
                victim.kill()
        psutil.wait_procs(alive, timeout=grace)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(1)
        self.procs = [p for p in self.procs if p not in procs]


def _descendants(pids: Sequence[int]) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                found[p.pid] = p
    return list(found.values())


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def leftovers(pattern: str) -> list[str]:
    """`pgrep -af PATTERN`, less this process: what is still running that matches."""
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] != str(os.getpid())]


def warn_leftovers(pattern: str) -> None:
    left = leftovers(pattern)
    if left:
        log(f"WARNING: {len(left)} process(es) matching {pattern!r} still running:\n  " + "\n  ".join(left[:20]))
    else:
        log(f"no process matching {pattern!r} left")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports free right now."""
    import socket

    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


# -- hcsdk ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hcsdk_fleet(root: Path, n: int, reaper: Reaper,
                proxy: list[str] | None = None) -> Iterator[tuple[Any, str | None]]:
    """A master and ``n`` agent processes (`bench-0000`...) all online; closed (and their process groups
    killed) on the way out, whatever happens. With ``proxy`` (its extra arguments) the agents sit behind
    one proxy (``edge``). Yields the fleet and the proxy's URL (None without one)."""
    from hcsdk.localfleet import LocalFleet

    fleet = LocalFleet(root)
    started: list[subprocess.Popen[bytes]] = []
    url: str | None = None
    try:
        t0 = time.monotonic()
        fleet.start_master()
        assert fleet.master is not None
        started.append(fleet.master.popen)
        reaper.adopt(fleet.master.popen)
        if proxy is not None:
            try:
                url = fleet.start_proxy("edge", extra=proxy)
            finally:
                if "edge" in fleet.agents:
                    started.append(fleet.agents["edge"].popen)
                    reaper.adopt(started[-1])
        for i in range(n):
            started.append(fleet.start_agent(f"bench-{i:04d}", extra=["--master", url] if url else None).popen)
            reaper.adopt(started[-1])
        # 100 Python processes importing on 2 cores take a while: wait generously
        fleet.wait_online(timeout=max(120.0, 3.0 * n))
        log(f"hcsdk: master + {'proxy + ' if url else ''}{n} agents online in {time.monotonic() - t0:.1f}s")
        yield fleet, url
    finally:
        with contextlib.suppress(Exception):
            _close_fleet(fleet)
        reaper.reap(started)


def _close_fleet(fleet: Any) -> None:
    """``fleet.close()`` stops agents one by one; send every agent SIGTERM first so that is quick."""
    for proc in fleet.agents.values():
        if proc.alive:
            with contextlib.suppress(OSError):
                proc.popen.send_signal(signal.SIGTERM)
    fleet.close()


def time_hcsdk(fleet: Any, n: int) -> Timing:
    """`client.run("echo hi")` to all ``n`` agents until the DataFrame is complete; every row must be ok."""
    client = fleet.client

    def once() -> None:
        df = client.run("echo hi", targets="bench-*", timeout=60).to_dataframe()
        bad = df[df["status"] != "ok"]
        if len(df) != n or len(bad) or not (df["stdout"].str.strip() == "hi").all():
            raise RuntimeError(f"hcsdk: {len(df)} rows, not ok: {bad[['hostname', 'status']].to_dict('records')}")

    return median_of(once)


def run_hcsdk(root: Path, n: int, reaper: Reaper) -> dict[str, Any]:
    """Start an hcsdk fleet of ``n`` agents, time ``client.run`` on it, measure one agent and the master, and
    where the CPU went: the master, all agents (with the shells they ran) and this process (the SDK)."""
    with hcsdk_fleet(root, n, reaper) as (fleet, _):
        parts = {"master": [fleet.master.popen.pid], "agents": [p.popen.pid for p in fleet.agents.values()]}
        before = {name: cpu_seconds(pids) for name, pids in parts.items()}
        sdk_before = _own_cpu()
        with OtherLoad() as load:
            timing = time_hcsdk(fleet, n)
        runs = 1 + len(timing.samples)
        cpu = {name: round(1000 * (cpu_seconds(pids) - before[name]) / runs, 1) for name, pids in parts.items()}
        cpu["sdk"] = round(1000 * (_own_cpu() - sdk_before) / runs, 1)
        log(f"hcsdk: client.run median {timing.median:.4f}s {fmt_samples(timing)}{fmt_busy(load.pct)}")
        log(f"hcsdk: CPU per run: master {cpu['master']:.0f} ms, agents {cpu['agents']:.0f} ms in all "
            f"({cpu['agents'] / n:.1f} ms each, with their shells), SDK {cpu['sdk']:.0f} ms")
        return {"client_run": timing.as_dict(), "other_cpu_pct": load.pct, "cpu_ms_per_run": cpu,
                "agent_memory": tree_memory(next(iter(fleet.agents.values())).popen.pid),
                "master_memory": tree_memory(fleet.master.popen.pid)}


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds used by these processes, with their reaped children (alive children are not counted)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _own_cpu() -> float:
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


def fmt_samples(t: Timing) -> str:
    return "(" + " ".join(f"{s:.4f}" for s in t.samples) + ")"


def other_load_note(results: Any) -> str:
    """One line on the largest CPU use by other processes seen during any timing in ``results``."""
    found: list[float] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key == "other_cpu_pct":
                    found.extend(v for v in (value.values() if isinstance(value, dict) else [value]) if v is not None)
                else:
                    walk(value)

    walk(results)
    worst = max(found, default=0.0)
    verdict = "a quiet machine" if worst < 10 else "NOT a quiet machine: the timings shared the CPU"
    return f"other processes used at most {worst:.0f}% of a core during the timings ({verdict})"


def fmt_busy(pct: float | None) -> str:
    """A warning when other processes used the CPU while we timed."""
    return f"  [other processes used {pct:.0f}% of a core meanwhile]" if pct and pct >= 10 else ""


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1))
        log(f"figures written to {path}")


def compare_main(doc: str, peer: str, requirements: Sequence[str], dist: str, default_n: list[int],
                 run_peer: Callable[[Path, Path, int, Reaper], dict[str, Any]],
                 report: Callable[[dict[int, dict[str, Any]], str], None], leftover_pattern: str) -> None:
    """The command line every peer script shares: for each N, the peer then hcsdk, in the same
    run; then the report, cleanup checks and the optional JSON."""
    sizes = " ".join(map(str, default_n))
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=default_n, help=f"fleet sizes (default {sizes})")
    ap.add_argument("--json", metavar="PATH", help="write every figure to PATH")
    ap.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                    help="before each N, wait up to S seconds until other processes leave the CPU alone")
    args = ap.parse_args()

    t0 = time.monotonic()
    reaper = Reaper()
    python, version = peer_venv(peer, requirements, dist)
    tmp = Path(tempfile.mkdtemp(prefix=f"hcsdk-peer-{peer}-"))
    results: dict[int, dict[str, Any]] = {}
    try:
        for n in args.n:
            log(f"--- N = {n}")
            wait_quiet(args.quiet_wait)
            results[n] = {peer: run_peer(python, tmp / f"{peer}-{n}", n, reaper)}
            wait_quiet(args.quiet_wait)
            results[n]["hcsdk"] = run_hcsdk(tmp / f"hcsdk-{n}", n, reaper)
    finally:
        reaper.reap()
        shutil.rmtree(tmp, ignore_errors=True)
        reaper.check_gone()
        warn_leftovers(leftover_pattern)
    report(results, version)
    elapsed = time.monotonic() - t0
    print(f"\ntotal time {elapsed:.0f}s")
    write_json(args.json, {"peer": peer, "version": version, "python": sys.version.split()[0],
                           "cores": os.cpu_count(), "elapsed_s": round(elapsed, 1),
                           "results": {str(n): r for n, r in results.items()}})
