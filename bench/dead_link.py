"""Dead-link detection: how long a silently partitioned agent stays "online", and how long it
takes to come back once the link heals.

A master and one agent run in two network namespaces joined by a veth pair (the SDK reaches
the master over a second veth from this machine's namespace). Once the agent is online, the
link goes silent: an iptables INPUT DROP on each end of that veth, so packets vanish in both
directions and nobody sees an RST or an ICMP error (the agent's own sends still "succeed").
Measured per round, from the moment the link goes silent:

  master   until `client.inventory()` shows the agent offline (polled every 0.2 s)
  agent    until the agent logs that its channel ended ("channel to ... ended")
  heal     after the link is restored, until the agent is online again

The goal is master and agent both at most 15 s. Default master and agent settings unless
--fast (the tests' short heartbeats). Needs root, iproute2 and iptables; the namespaces are
removed on exit. A benchmark, not a test: run it by hand.

    python bench/dead_link.py [--rounds 3] [--fast] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from topology import Topology, available  # noqa: E402

from hcsdk.localfleet import ZY, LocalFleet, Proc, wait_for  # noqa: E402

PORT = 8443  # the master's namespace is new: nothing else listens there
ENDED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) zy\.channel WARNING (channel to \S+ ended: .*)$", re.M)


def iptables(ns: str, *rule: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "iptables", *rule], check=True, capture_output=True)


class Link:
    """The veth between the master's and the agent's namespaces, silenced and restored by an
    INPUT DROP at both ends (so no RST, no ICMP, and no EPERM for a sender either)."""

    def __init__(self, ends: list[tuple[str, str]]):
        self.ends = ends  # (namespace, device)
        self.silent = False

    def _rules(self, op: str) -> None:
        for ns, dev in self.ends:
            iptables(ns, op, "INPUT", "-i", dev, "-j", "DROP")

    def silence(self) -> None:
        self._rules("-I")
        self.silent = True

    def restore(self) -> None:
        if self.silent:
            self._rules("-D")
            self.silent = False


def start_master(fleet: LocalFleet, ns: str, wrap: list[str], sdk_addr: str, agent_addr: str,
                 extra: list[str]) -> None:
    """`LocalFleet.start_master`, but inside the master's namespace (it takes no ``wrap``)."""
    argv = [*wrap, *ZY, "master", "--data-dir", str(fleet.root / "master"), "--listen", f"0.0.0.0:{PORT}",
            "--no-user-config", "--advertise", f"https://{agent_addr}:{PORT}",
            "--advertise", f"https://{sdk_addr}:{PORT}", *extra]
    master = fleet.master = Proc("master", argv, fleet.root / "master.log", fleet.env)

    def listening() -> bool:
        if not master.alive:
            raise AssertionError(f"master in {ns} exited:\n" + master.output())
        return "listening on" in master.output()

    wait_for(listening, 30, "master to listen")
    fleet.port = PORT
    fleet.url = f"https://{sdk_addr}:{PORT}"  # the SDK's own way in, not the agents' link


def log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def one_round(fleet: LocalFleet, agent: Proc, link: Link, name: str, timeout: float) -> dict[str, Any]:
    seen = len(agent.output())
    t0_wall, t0 = time.time(), time.monotonic()
    link.silence()
    master_s: float | None = None
    agent_s: float | None = None
    reason = ""
    while (master_s is None or agent_s is None) and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        if master_s is None and name not in fleet.online():
            master_s = time.monotonic() - t0
        if agent_s is None and (m := ENDED.search(agent.output()[seen:])):
            agent_s = max(0.0, log_time(m.group(1)) - t0_wall)  # the line's own timestamp: exact
            reason = m.group(2)
    link.restore()
    t1 = time.monotonic()
    heal_s: float | None = None
    try:
        wait_for(lambda: name in fleet.online(), timeout, f"{name} back online")
        heal_s = time.monotonic() - t1
    except AssertionError:
        pass
    return {"master_s": master_s, "agent_s": agent_s, "heal_s": heal_s, "agent_reason": reason}


def fmt(value: float | None) -> str:
    return "   >limit" if value is None else f"{value:8.1f}s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fast", action="store_true", help="agent with the tests' short heartbeats and backoff")
    ap.add_argument("--timeout", type=float, default=90, help="give up on a figure after this many seconds")
    ap.add_argument("--master-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `zy master` (repeatable, e.g. --master-arg=--dead-after=10)")
    ap.add_argument("--agent-arg", action="append", default=[], metavar="ARG", help="extra argument for `zy agent`")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    ap.add_argument("--show-logs", action="store_true", help="print the master's and the agent's logs at the end")
    args = ap.parse_args()
    if not available():
        sys.exit("dead_link: needs root, iproute2 and network namespaces")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks: namespaces are removed

    signal.signal(signal.SIGTERM, stop)
    topo = Topology()
    link: Link | None = None
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zy-bench-") as tmp:
        fleet = LocalFleet(Path(tmp))
        try:
            master_ns, agent_ns = topo.host("master"), topo.host("agent")
            _, sdk_addr = topo.link(None, master_ns)  # this machine -> master: the SDK
            master_addr, _ = topo.link(master_ns, agent_ns)  # master <-> agent: the link that dies
            devs = topo._devs[(master_ns, agent_ns)]
            link = Link([(master_ns, devs[0]), (agent_ns, devs[1])])
            start_master(fleet, master_ns, topo.wrap(master_ns), sdk_addr, master_addr, args.master_arg)
            agent = fleet.start_agent("dl-1", fast=args.fast, wrap=topo.wrap(agent_ns),
                                      extra=["--master", f"https://{master_addr}:{PORT}", *args.agent_arg])
            fleet.wait_online(timeout=60)
            print(f"master in {master_ns} ({master_addr}), agent in {agent_ns}; "
                  f"{'--fast agent' if args.fast else 'default settings'}")
            print(" round   master offline   agent noticed   back online after heal")
            for i in range(1, args.rounds + 1):
                time.sleep(3)  # a settled channel: heartbeats flowing both ways
                r = one_round(fleet, agent, link, "dl-1", args.timeout)
                rounds.append(r)
                print(f"  {i:3d}      {fmt(r['master_s'])}       {fmt(r['agent_s'])}       {fmt(r['heal_s'])}"
                      f"    ({r['agent_reason'] or 'no log line'})", flush=True)
                if r["heal_s"] is None:
                    raise SystemExit("the agent did not come back; stopping")
            if args.show_logs:
                print(fleet.logs())
        except BaseException:
            print(fleet.logs()[-6000:], file=sys.stderr)
            raise
        finally:
            if link is not None:
                try:
                    link.restore()
                except subprocess.CalledProcessError:
                    pass
            fleet.close()
            topo.close()
    worst = {key: max((r[key] for r in rounds if r[key] is not None), default=None)
             for key in ("master_s", "agent_s", "heal_s")}
    print(f"  max      {fmt(worst['master_s'])}       {fmt(worst['agent_s'])}       {fmt(worst['heal_s'])}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "max": worst, "fast": args.fast}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
