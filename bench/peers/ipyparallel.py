"""ipyparallel vs hcsdk: `echo hi` in a subprocess on N engines against `client.run("echo hi")` on N hcsdk agents.

    .venv/bin/python bench/peers/ipyparallel.py [--n 10 50] [--json PATH]

Installs ipyparallel 9.x from PyPI into its own cached venv (~/.cache/hcsdk-bench/peers/), then for each N:
starts `ipcontroller` and N `ipengine` processes on loopback (profile dir under a temporary folder), times
`DirectView.apply_sync` of a function running `subprocess.check_output(['echo', 'hi'])` on every engine
(warm-up, then the median of 5), stops them; then starts an hcsdk master and N agent processes and times
`client.run("echo hi", targets=..., timeout=60).to_dataframe()` the same way. Prints the medians, the ratio and
the memory of one engine beside one agent.

Not like for like: ipyparallel calls a pickled Python function in kernels that are already connected and
returns Python objects, keeping nothing; hcsdk runs a shell per target in its own process group, stores every
task and result (SQLite, on the master and in each agent's spool) and streams them back as events.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

from _common import (
    OtherLoad,
    Reaper,
    Timing,
    compare_main,
    fmt_busy,
    fmt_mem,
    fmt_samples,
    log,
    other_load_note,
    ratio,
    tree_memory,
    wait_until,
)

HERE = Path(__file__).resolve().parent
REQUIREMENTS = ["ipyparallel>=9,<10"]
REFERENCE = {10: 0.031, 50: 0.17}  # someone else's figures on this machine type


class IppCluster:
    """`ipcontroller` and N `ipengine` processes sharing one profile dir."""

    def __init__(self, python: Path, root: Path, n: int, reaper: Reaper):
        self.python, self.root, self.n, self.reaper = python, root, n, reaper
        self.bin = python.parent
        self.profile = root / "profile"
        self.procs: list[subprocess.Popen[bytes]] = []
        # PYTHONSAFEPATH: nothing started from here may import this folder's ipyparallel.py
        self.env = {**os.environ, "PYTHONSAFEPATH": "1", "IPYTHONDIR": str(root / "ipython")}

    @property
    def client_json(self) -> Path:
        return self.profile / "security" / "ipcontroller-client.json"

    def start(self) -> None:
        self.profile.mkdir(parents=True)
        controller = self.reaper.popen([self.bin / "ipcontroller", f"--profile-dir={self.profile}", "--ip=127.0.0.1"],
                                       self.root / "controller.log", env=self.env)
        self.procs.append(controller)

        def ready() -> bool:
            if controller.poll() is not None:
                raise RuntimeError("ipcontroller exited:\n" + (self.root / "controller.log").read_text()[-2000:])
            return self.client_json.exists() and (self.profile / "security" / "ipcontroller-engine.json").exists()

        wait_until(ready, 120, "ipcontroller to write its connection files")
        for i in range(self.n):
            self.procs.append(self.reaper.popen([self.bin / "ipengine", f"--profile-dir={self.profile}"],
                                                self.root / f"engine-{i:04d}.log", env=self.env))

    def bench(self) -> dict[str, Any]:
        wait = max(120.0, 3.0 * self.n)
        argv = [str(self.python), "-P", str(HERE / "_ipp_client.py"), str(self.client_json), str(self.n), str(wait),
                "5"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=wait + 300, env=self.env)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def stop(self) -> None:
        self.reaper.reap(self.procs)


def run_ipp(python: Path, root: Path, n: int, reaper: Reaper) -> dict[str, Any]:
    cluster = IppCluster(python, root, n, reaper)
    try:
        cluster.start()
        with OtherLoad() as load:  # engines starting, then the timed calls (in one helper process)
            out = cluster.bench()
        timing = Timing(statistics.median(out["samples"]), out["samples"])
        log(f"ipyparallel: {n} engines registered (client waited {out['waited_s']:.0f}s); "
            f"apply_sync median {timing.median:.4f}s {fmt_samples(timing)}{fmt_busy(load.pct)}")
        return {"apply_sync": timing.as_dict(), "other_cpu_pct": load.pct,
                "engine_memory": tree_memory(cluster.procs[1].pid),
                "controller_memory": tree_memory(cluster.procs[0].pid)}
    finally:
        cluster.stop()


def report(results: dict[int, dict[str, Any]], version: str) -> None:
    print(f"\nipyparallel {version} vs hcsdk: `echo hi` on N targets, warm-up then median of 5 "
          f"({os.cpu_count()} cores; every target returned 'hi')")
    print(f"{'N':>4} {'ipp apply_sync':>15} {'hcsdk':>9} {'hcsdk/ipp':>10}   reference ipp")
    for n, r in results.items():
        ipp, hc = r["ipyparallel"]["apply_sync"]["median_s"], r["hcsdk"]["client_run"]["median_s"]
        ref = REFERENCE.get(n)
        print(f"{n:>4} {ipp:>14.4f}s {hc:>8.4f}s {ratio(hc, ipp) or 0:>9.1f}x" + (f"   {ref} s" if ref else ""))
    print(other_load_note(results))
    last = results[max(results)]
    print("\nmemory (MiB), at the largest N:")
    print(f"  one ipengine    : {fmt_mem(last['ipyparallel']['engine_memory'])}   (reference: 98 MB RSS)")
    print(f"  one hcsdk agent : {fmt_mem(last['hcsdk']['agent_memory'])}")
    print(f"  ipcontroller    : {fmt_mem(last['ipyparallel']['controller_memory'])}")
    print(f"  hcsdk master    : {fmt_mem(last['hcsdk']['master_memory'])}")


def main() -> None:
    compare_main(__doc__ or "", "ipyparallel", REQUIREMENTS, "ipyparallel", [10, 50], run_ipp, report,
                 "ipengine|ipcontroller")


if __name__ == "__main__":
    main()
