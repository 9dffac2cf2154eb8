"""Salt vs hcsdk: `cmd.run 'echo hi'` on N minions against `client.run("echo hi")` on N hcsdk agents.

    .venv/bin/python bench/peers/salt.py [--n 10 50 100] [--json PATH]

Installs salt from PyPI into its own cached venv (~/.cache/hcsdk-bench/peers/), then for each N: starts a
salt-master and N salt-minion processes on loopback (configs and state under a temporary folder), waits until
all N answer test.ping, times `LocalClient().cmd('*', 'cmd.run', ['echo hi'])` and the CLI
`salt '*' cmd.run 'echo hi'` (warm-up, then the median of 5; every minion must return "hi"), stops salt; then
starts an hcsdk master and N agent processes and times `client.run("echo hi", targets=..., timeout=60)
.to_dataframe()` the same way. Prints the medians, the ratios and the memory of one minion beside one agent.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
from _common import (
    OtherLoad,
    Reaper,
    Timing,
    compare_main,
    cpu_seconds,
    fmt_busy,
    fmt_mem,
    fmt_samples,
    free_ports,
    log,
    median_of,
    other_load_note,
    ratio,
    tree_memory,
    wait_until,
)

HERE = Path(__file__).resolve().parent
# salt 3008.x (3008.4 when written) declares everything it needs on Python 3.11 (looseversion, packaging, tornado,
# pyzmq, jaraco.*) and its CLI no longer imports pkg_resources, so it installs and runs with no extra pin. Older
# salts (3006/3007) are said to want `setuptools<81` (pkg_resources) and `looseversion` added: untested here, hence
# the floor.
REQUIREMENTS = ["salt>=3008"]
# Minions are started this many at a time, the next batch once the master has accepted the keys of the last: 100
# minions authenticating at once on 2 cores swamp the master's 5 workers (auth requests time out and are retried).
BATCH = 10
REFERENCE = {10: (0.55, 1.9), 50: (3.3, 6.8), 100: (7.0, 19.4)}  # LocalClient, CLI: someone else's, this machine type


def master_config(root: Path, pub: int, ret: int) -> str:
    return f"""\
root_dir: {root}
user: {getpass.getuser()}
interface: 127.0.0.1
publish_port: {pub}
ret_port: {ret}
auto_accept: True
open_mode: False
file_roots:
  base: [{root}/srv/salt]
pillar_roots:
  base: [{root}/srv/pillar]
log_file: {root}/master.log
log_level: warning
log_level_logfile: warning
"""


def minion_config(root: Path, minion_id: str, pub: int, ret: int) -> str:
    # enable_fqdns_grains off: with no DNS here the reverse look-ups only slow the start (no effect on cmd.run)
    return f"""\
id: {minion_id}
root_dir: {root}
user: {getpass.getuser()}
master: 127.0.0.1
master_port: {ret}
publish_port: {pub}
acceptance_wait_time: 1
enable_fqdns_grains: False
file_client: remote
log_file: {root}/minion.log
log_level: warning
log_level_logfile: warning
"""


class SaltFleet:
    """A salt-master and N salt-minions, each minion with its own config dir and root_dir."""

    def __init__(self, python: Path, root: Path, n: int, reaper: Reaper):
        self.python, self.root, self.n, self.reaper = python, root, n, reaper
        self.bin = python.parent
        self.pub, self.ret = free_ports(2)
        self.master_dir = root / "master"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.minions: list[subprocess.Popen[bytes]] = []
        # -P (PYTHONSAFEPATH): nothing started from here may import this folder's salt.py as `salt`
        self.env = {**os.environ, "PYTHONSAFEPATH": "1"}

    def start(self) -> None:
        t0 = time.monotonic()
        self.master_dir.mkdir(parents=True)
        for sub in ("srv/salt", "srv/pillar"):
            (self.master_dir / sub).mkdir(parents=True)
        (self.master_dir / "master").write_text(master_config(self.master_dir, self.pub, self.ret))
        self._spawn([self.bin / "salt-master", "-c", self.master_dir], self.master_dir / "stdout.log")
        wait_until(self._master_listening, 120, "salt-master to listen")
        for first in range(0, self.n, BATCH):
            for i in range(first, min(first + BATCH, self.n)):
                self._start_minion(i)
            wait_until(lambda: self._accepted() >= len(self.minions), max(120.0, 3.0 * self.n),
                       f"salt-master to accept {len(self.minions)} minion keys")
        log(f"salt: {self.n} minion keys accepted after {time.monotonic() - t0:.1f}s")
        self._wait_ping(max(180.0, 4.0 * self.n))
        log(f"salt: master + {self.n} minions answer test.ping after {time.monotonic() - t0:.1f}s")

    def _start_minion(self, i: int) -> None:
        mdir = self.root / f"minion-{i:04d}"
        mdir.mkdir()
        (mdir / "minion").write_text(minion_config(mdir, f"salt-bench-{i:04d}", self.pub, self.ret))
        self.minions.append(self._spawn([self.bin / "salt-minion", "-c", mdir], mdir / "stdout.log"))

    def _accepted(self) -> int:
        """Minion keys the master has accepted (auto_accept): files in <root_dir>/etc/salt/pki/master/minions."""
        if any(p.poll() is not None for p in self.procs):
            raise RuntimeError("a salt process exited:\n" + tail(self.master_dir / "master.log"))
        keys = self.master_dir / "etc" / "salt" / "pki" / "master" / "minions"
        return len(list(keys.iterdir())) if keys.is_dir() else 0

    def _spawn(self, argv: list[Any], log_path: Path) -> subprocess.Popen[bytes]:
        proc = self.reaper.popen(argv, log_path, env=self.env)
        self.procs.append(proc)
        return proc

    def _master_listening(self) -> bool:
        if self.procs[0].poll() is not None:
            raise RuntimeError("salt-master exited:\n" + tail(self.master_dir / "stdout.log"))
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.ret)) == 0

    def _wait_ping(self, timeout: float) -> None:
        out = self.helper("ping", str(timeout), timeout + 60)
        if len(out["answered"]) < self.n:
            dead = [p.pid for p in self.minions if p.poll() is not None]
            first_log = tail(self.root / "minion-0000" / "minion.log")
            raise RuntimeError(f"only {len(out['answered'])} of {self.n} minions answer test.ping "
                               f"({len(dead)} minion processes exited)\n{first_log}")

    def helper(self, mode: str, arg: str, timeout: float) -> dict[str, Any]:
        argv = [str(self.python), "-P", str(HERE / "_salt_client.py"), mode, str(self.master_dir / "master"),
                str(self.n), arg]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def time_local_client(self) -> Timing:
        out = self.helper("bench", "5", 60 * 8)
        samples = out["samples"]
        return Timing(statistics.median(samples), samples)

    def time_cli(self) -> Timing:
        argv = [str(self.bin / "salt"), "-c", str(self.master_dir), "--out=json", "--static", "-t", "60",
                "*", "cmd.run", "echo hi"]

        def once() -> None:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=self.env)
            ret = json.loads(proc.stdout) if proc.stdout.strip() else {}
            ok = [k for k, v in ret.items() if v == "hi"]
            if len(ok) != self.n:
                raise RuntimeError(f"salt CLI: {len(ok)} of {self.n} returned 'hi' (rc {proc.returncode}): "
                                   f"{proc.stdout[-500:]}{proc.stderr[-1500:]}")

        return median_of(once)

    @staticmethod
    def tree_pids(pid: int) -> list[int]:
        """The long-lived processes of a salt daemon (job processes come and go; their CPU lands in the parent)."""
        proc = psutil.Process(pid)
        return [pid, *(p.pid for p in proc.children(recursive=True))]

    def minion_memory(self) -> dict[str, Any]:
        return tree_memory(self.minions[0].pid)

    def master_memory(self) -> dict[str, Any]:
        return tree_memory(self.procs[0].pid)

    def stop(self) -> None:
        self.reaper.reap(self.procs)


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"({path} unreadable)"


def run_salt(python: Path, root: Path, n: int, reaper: Reaper) -> dict[str, Any]:
    fleet = SaltFleet(python, root, n, reaper)
    try:
        fleet.start()
        parts = {"master": fleet.tree_pids(fleet.procs[0].pid),
                 "minions": [pid for m in fleet.minions for pid in fleet.tree_pids(m.pid)]}
        before = {name: cpu_seconds(pids) for name, pids in parts.items()}
        with OtherLoad() as load_lc:
            local = fleet.time_local_client()
        cpu = {name: round(1000 * (cpu_seconds(pids) - before[name]) / (1 + len(local.samples)), 1)
               for name, pids in parts.items()}
        log(f"salt: LocalClient median {local.median:.3f}s {fmt_samples(local)}{fmt_busy(load_lc.pct)}")
        log(f"salt: CPU per LocalClient run: master {cpu['master']:.0f} ms, minions {cpu['minions']:.0f} ms in all "
            f"({cpu['minions'] / n:.1f} ms each, with their job processes)")
        with OtherLoad() as load_cli:
            cli = fleet.time_cli()
        log(f"salt: CLI median {cli.median:.3f}s {fmt_samples(cli)}{fmt_busy(load_cli.pct)}")
        return {"local_client": local.as_dict(), "cli": cli.as_dict(), "local_client_cpu_ms_per_run": cpu,
                "other_cpu_pct": {"local_client": load_lc.pct, "cli": load_cli.pct},
                "minion_memory": fleet.minion_memory(), "master_memory": fleet.master_memory()}
    finally:
        fleet.stop()


def report(results: dict[int, dict[str, Any]], version: str) -> None:
    print(f"\nsalt {version} vs hcsdk: `echo hi` on N targets, warm-up then median of 5 "
          f"({os.cpu_count()} cores; every target returned 'hi')")
    print(f"{'N':>4} {'salt LocalClient':>17} {'salt CLI':>9} {'hcsdk':>8} {'LocalClient/hcsdk':>18} "
          f"{'CLI/hcsdk':>10}   reference LocalClient, CLI")
    for n, r in results.items():
        lc, cli, hc = (r["salt"]["local_client"]["median_s"], r["salt"]["cli"]["median_s"],
                       r["hcsdk"]["client_run"]["median_s"])
        ref = REFERENCE.get(n)
        print(f"{n:>4} {lc:>16.3f}s {cli:>8.3f}s {hc:>7.3f}s {ratio(lc, hc) or 0:>17.1f}x {ratio(cli, hc) or 0:>9.1f}x"
              + (f"   {ref[0]} s, {ref[1]} s" if ref else ""))
    print(other_load_note(results))
    last = results[max(results)]
    print("\nmemory (MiB), at the largest N:")
    print(f"  one salt-minion : {fmt_mem(last['salt']['minion_memory'])}   (reference: 119 MB RSS, 75 MB PSS)")
    print(f"  one hcsdk agent : {fmt_mem(last['hcsdk']['agent_memory'])}")
    print(f"  salt-master     : {fmt_mem(last['salt']['master_memory'])}")
    print(f"  hcsdk master    : {fmt_mem(last['hcsdk']['master_memory'])}")


def main() -> None:
    compare_main(__doc__ or "", "salt", REQUIREMENTS, "salt", [10, 50, 100], run_salt, report, "salt-")


if __name__ == "__main__":
    main()
