"""Release distribution on a real topology: the same artifact to M agents three ways, in one run.

    python bench/release.py [--agents 20] [--size-mib 200] [--thin-mbit 20] [--lan-mbit 1000]
                            [--modes a,b,c] [--json PATH] [--keep] [--master-arg ARG] [--agent-arg ARG]

Network namespaces (needs root, iproute2, tc):

    master ==thin link== proxy --+-- LAN switch --+-- agent 1 .. agent M
     (tbf, --thin-mbit, both ways)   (a bridge; every port tbf --lan-mbit both ways)

The SDK reaches the master over a link of its own from this machine's namespace. Every agent is
a real `zy agent` process in a namespace of its own (own address, state dir and hostname); the
proxy is a real `zy proxy` with its chunk cache. Modes, each starting cold (agents' chunks and
releases and the proxy's cache wiped, processes started afresh):

  a  every agent fetches from the master: agents are given the master's URL, and the proxy's
     namespace forwards IP (during this mode only), so the agents' own connections cross the
     thin link. No `zy proxy` runs.
  b  through the proxy's cache only (release with p2p=False)
  c  proxy cache + P2P among the agents (p2p=True; the proxy is the tracker)

Figures per mode, from the interfaces' own byte counters (headers included):
  thin      bytes master -> proxy on the thin link, as a multiple of the file (target 1.00x for b, c);
            in brackets the TCP payload (bytes less 66 bytes of headers a packet): the tbf splits
            every packet to MTU size, so the wire figure carries ~4.5% of headers
  proxy     bytes the proxy sent into the LAN (target for c: at most 2x, against Mx for b); LAN
            ports count GSO packets (one set of headers per up to 64 KiB), so ~0.3% of headers
  agents    bytes the agents sent into the LAN (chunks served to peers, plus requests)
  fetch     release created -> the last agent has the whole file (checked)
  done      release created -> the release is done (fetch, then place on every agent)
  bound     the lower bound for the mode (formula printed with the numbers), and done/bound

For (b) and (c) the issue's one-seed bound max(F/U_proxy, M*F/(U_proxy + sum U_agents), F/D_min)
assumes the seed holds the file; here the seed (the proxy) receives it over the thin link first,
so the bound used also has F/thin (the issue's own is printed beside it). U and D are the tbf
rates of the LAN ports; (b) has no agent uploads, so its middle term is M*F/U_proxy. For (a)
the bound is M*F/thin. At the defaults mode (a) alone moves M*F over 20 Mbit/s (~28 min). A mode
whose release does not complete is shown as such, with the bytes it moved until then.
"machine cpu" is the whole machine's (2 cores here), whatever else runs on it meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _netns
from _netns import Lan, Topology

from hcsdk._proxies import proxies_sync
from hcsdk.localfleet import ZY, LocalFleet, Proc, wait_for
from hcsdk.protocol.manifest import CHUNK_SIZE

MASTER_PORT, PROXY_PORT = 8443, 8444  # their namespaces are new: nothing else listens there
MODES = {"a": "master direct", "b": "proxy cache", "c": "cache + P2P"}
MIB = 2**20


def mbps(mbit: float) -> float:
    """Bytes a second of a link of ``mbit`` Mbit/s."""
    return mbit * 1e6 / 8


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass
class Net:
    """The namespaces, and the addresses and devices the benchmark reads."""

    topo: Topology
    master_ns: str
    proxy_ns: str
    sdk_addr: str  # the master, as this machine reaches it
    master_addr: str  # the master on the thin link
    proxy_up: str  # the proxy on the thin link
    thin_dev: str  # the master's end of the thin link
    lan: Lan
    proxy_lan: str
    agents: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (namespace, LAN address)


def build_net(topo: Topology, agents: int, thin_mbit: float, lan_mbit: float) -> Net:
    master_ns, proxy_ns = topo.host("master"), topo.host("proxy")
    _, sdk_addr = _netns.root_link(topo, master_ns)
    master_addr, proxy_up = topo.link(master_ns, proxy_ns)
    topo.thin(master_ns, proxy_ns, f"{thin_mbit}mbit")
    lan = Lan(topo, lan_mbit)
    proxy_lan = lan.plug(proxy_ns, 1)
    _netns.route(master_ns, f"{Lan.PREFIX}.0/24", proxy_up)  # used in mode (a) only: see forwarding()
    net = Net(topo, master_ns, proxy_ns, sdk_addr, master_addr, proxy_up, topo._devs[(master_ns, proxy_ns)][0],
              lan, proxy_lan)
    for i in range(agents):
        name = f"rel-{i + 1:02d}"
        ns = topo.host(f"a{i + 1}")
        net.agents[name] = (ns, lan.plug(ns, 10 + i))
        _netns.route(ns, "default", proxy_lan)
    return net


def forwarding(net: Net, on: bool) -> None:
    _netns.in_ns(net.proxy_ns, "sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}")


def start_master(fleet: LocalFleet, net: Net, extra: list[str]) -> None:
    """`LocalFleet.start_master`, but inside the master's namespace (as bench/dead_link.py)."""
    argv = [*net.topo.wrap(net.master_ns), *ZY, "master", "--data-dir", str(fleet.root / "master"),
            "--listen", f"0.0.0.0:{MASTER_PORT}", "--no-user-config",
            "--advertise", f"https://{net.master_addr}:{MASTER_PORT}",
            "--advertise", f"https://{net.sdk_addr}:{MASTER_PORT}", *extra]
    master = fleet.master = Proc("master", argv, fleet.root / "master.log", fleet.env)

    def listening() -> bool:
        if not master.alive:
            raise AssertionError("master exited:\n" + master.output())
        return "listening on" in master.output()

    wait_for(listening, 30, "master to listen")
    fleet.port = MASTER_PORT
    fleet.url = f"https://{net.sdk_addr}:{MASTER_PORT}"


def make_artifact(fleet: LocalFleet, size: int) -> dict[str, Any]:
    path = fleet.root / "artifact.bin"
    with open(path, "wb") as fh:
        for left in range(size, 0, -CHUNK_SIZE):
            fh.write(os.urandom(min(CHUNK_SIZE, left)))
    t0 = time.monotonic()
    art = fleet.client.artifacts.upload(path)
    print(f"uploaded {size / MIB:.0f} MiB artifact {art['id'][:12]} in {time.monotonic() - t0:.1f}s")
    path.unlink()
    return art


# -- the nodes of one mode -------------------------------------------------------------------------

def stop_nodes(fleet: LocalFleet) -> None:
    procs = list(fleet.agents.values())
    for proc in procs:
        if proc.alive:
            proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.stop(10)
    names = set(fleet.agents)
    fleet.agents.clear()
    try:
        wait_for(lambda: not names & fleet.online(), 30, "the previous mode's nodes offline")
    except AssertionError:
        pass  # the new processes replace their sessions anyway


def wipe(fleet: LocalFleet, net: Net) -> None:
    """Cold start: no chunk on any agent, nothing in the proxy's cache."""
    for name in net.agents:
        shutil.rmtree(fleet.root / "agents" / name / "releases", ignore_errors=True)
    shutil.rmtree(fleet.root / "proxies" / "edge" / "cache", ignore_errors=True)
    shutil.rmtree(fleet.root / "dest", ignore_errors=True)


def start_nodes(fleet: LocalFleet, net: Net, mode: str, agent_args: list[str]) -> None:
    upstream = f"https://{net.master_addr}:{MASTER_PORT}"
    if mode == "a":
        url = upstream
    else:
        # production heartbeat settings (LocalFleet's are the tests' short ones)
        url = fleet.start_proxy("edge", upstreams=[upstream], port=PROXY_PORT, host=net.proxy_lan,
                                wrap=net.topo.wrap(net.proxy_ns),
                                extra=["--stats-every", "1", "--heartbeat", "5", "--dead-after", "12"])
    for name, (ns, _) in net.agents.items():
        fleet.start_agent(name, {"bench": "release"}, extra=["--master", url, *agent_args], fast=False,
                          wrap=net.topo.wrap(ns))
    fleet.wait_online(timeout=60 + 5 * len(net.agents))


# -- measuring ------------------------------------------------------------------------------------

def snapshot(net: Net) -> dict[str, float]:
    thin = _netns.counters(net.master_ns, net.thin_dev)
    busy, total = cpu_times()
    return {"thin": thin["tx_bytes"], "thin_payload": thin["tx_bytes"] - _netns.HEADERS * thin["tx_packets"],
            "proxy": _netns.counters(net.proxy_ns, "lan0")["tx_bytes"],
            "agents": sum(_netns.counters(ns, "lan0")["tx_bytes"] for ns, _ in net.agents.values()),
            "cpu_busy": busy, "cpu_total": total, "t": time.time()}


def mib_on_disk(fleet: LocalFleet, net: Net) -> float:
    """What the agents' release files hold so far (allocated blocks: a part file is sparse until
    its chunks come)."""
    files = (p for n in net.agents for p in (fleet.root / "agents" / n / "releases").glob("*/*")
             if not p.name.endswith(".json"))
    return sum(p.stat().st_blocks * 512 for p in files if p.is_file()) / MIB


def bound(mode: str, size: int, agents: int, thin_mbit: float, lan_mbit: float) -> dict[str, Any]:
    """The lower bound of the mode's completion time, with its formula and numbers."""
    f, m, thin, lan = size, agents, mbps(thin_mbit), mbps(lan_mbit)
    mb = f / 1e6
    if mode == "a":
        s = m * f / thin
        return {"seconds": s, "issue_seconds": s,
                "formula": f"M*F/thin = {m}*{mb:.1f}MB / {thin / 1e6:.2f}MB/s = {s:.1f}s"}
    uploaders = (m if mode == "c" else 0) * lan
    terms = {"F/thin": f / thin, "F/U_proxy": f / lan, "M*F/(U_proxy+sum U_agents)": m * f / (lan + uploaders),
             "F/D_min": f / lan}
    issue = max(v for k, v in terms.items() if k != "F/thin")
    text = (f"max(F/thin = {mb:.1f}/{thin / 1e6:.2f} = {terms['F/thin']:.1f}s, "
            f"F/U_proxy = {mb:.1f}/{lan / 1e6:.1f} = {terms['F/U_proxy']:.2f}s, "
            f"M*F/(U_proxy+sum U_agents) = {m}*{mb:.1f}/({lan / 1e6:.1f}+{uploaders / 1e6:.1f}) = "
            f"{terms['M*F/(U_proxy+sum U_agents)']:.2f}s, F/D_min = {mb:.1f}/{lan / 1e6:.1f} = {terms['F/D_min']:.2f}s)"
            f" = {max(terms.values()):.1f}s   [issue's, without F/thin: {issue:.2f}s]")
    return {"seconds": max(terms.values()), "issue_seconds": issue, "terms": terms, "formula": text}


def follow(rel: Any, fleet: LocalFleet, net: Net, size: int, start: dict[str, float], every: float) -> None:
    """Print progress until the release is finished."""
    total = len(net.agents) * size // MIB
    last = 0.0
    while rel.refresh()["state"] not in ("done", "paused", "aborted", "rolled_back", "failed"):
        time.sleep(0.5)
        if time.monotonic() - last < every:
            continue
        last = time.monotonic()
        now = snapshot(net)
        dt = now["t"] - start["t"]
        thin = now["thin"] - start["thin"]
        phases: dict[str, int] = {}
        for t in rel.info["targets"]:
            phases[t["phase"]] = phases.get(t["phase"], 0) + 1
        print(f"    {dt:7.1f}s  on disk {mib_on_disk(fleet, net):7.0f}/{total} MiB  "
              f"thin {thin / MIB:8.1f} MiB ({thin / size:5.2f}xF, {thin * 8 / dt / 1e6:5.1f} Mbit/s)  "
              f"proxy->LAN {(now['proxy'] - start['proxy']) / MIB:8.1f} MiB  "
              f"agents->LAN {(now['agents'] - start['agents']) / MIB:8.1f} MiB  "
              f"phases {dict(sorted(phases.items()))}", flush=True)


def proxy_counters(fleet: LocalFleet, since: float) -> dict[str, Any]:
    """The proxy's own cache counters (payload bytes, counted from its start with this mode). It
    reports every second when they changed: after a short wait, the last report is the final one."""
    time.sleep(2.5)
    df = proxies_sync(fleet.client)
    row = df[(df["hostname"] == "edge") & df["stats_at"].notna()]
    if row.empty or row.iloc[0]["stats_at"].timestamp() < since:
        return {}
    return {k: float(row.iloc[0][k]) for k in ("bytes_from_upstream", "bytes_served", "hits", "misses", "coalesced",
                                                "upstream_fetches")}


def run_mode(mode: str, fleet: LocalFleet, net: Net, art: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    size, m = art["manifest"]["size"], len(net.agents)
    lb = bound(mode, size, m, args.thin_mbit, args.lan_mbit)
    print(f"\n== mode ({mode}) {MODES[mode]}: {m} agents, {size / MIB:.0f} MiB; lower bound {lb['seconds']:.0f}s "
          f"(~{lb['seconds'] / 60:.1f} min)", flush=True)
    stop_nodes(fleet)
    wipe(fleet, net)
    forwarding(net, mode == "a")
    t0 = time.monotonic()
    start_nodes(fleet, net, mode, args.agent_arg)
    print(f"  {m} agents{'' if mode == 'a' else ' and the proxy'} online in {time.monotonic() - t0:.1f}s", flush=True)
    (fleet.root / "dest").mkdir()
    time.sleep(2)  # a settled channel before counting
    uuids = [fleet.uuid_of(n) for n in net.agents]
    start = snapshot(net)
    rel = fleet.client.release(art["id"], uuids, dest=f"{fleet.root}/dest/{{hostname}}.bin", batch=m,
                               p2p=mode == "c", timeout=max(600.0, 4 * lb["seconds"] + 120))
    follow(rel, fleet, net, size, start, args.every)
    end = snapshot(net)
    out = figures(mode, rel, start, end, size, m, lb, proxy_counters(fleet, start["t"]) if mode != "a" else {})
    out["channel_losses"] = sum(p.output().count("zy.channel WARNING channel to") for p in fleet.agents.values())
    if rel.state != "done":
        print(f"  ({mode}) release {rel.id} ended {rel.state}: {rel.info['message']}", flush=True)
        for t in rel.info["targets"]:
            if t["status"] == "failed":
                print(f"    {t['hostname']}: {t['error']}")
        rel.abort()
    return out


def figures(mode: str, rel: Any, start: dict[str, float], end: dict[str, float], size: int, m: int,
            lb: dict[str, Any], counters: dict[str, Any]) -> dict[str, Any]:
    """The mode's figures; a release that did not complete has no times (None)."""
    info, df = rel.info, rel.progress()
    created, ok = float(info["created_at"]), rel.state == "done"
    fetched = max(float(t["started_at"]) + float(t["fetch_s"]) for t in info["targets"]) - created if ok else None
    done = float(info["updated_at"]) - created if ok else None
    out: dict[str, Any] = {"mode": mode, "name": MODES[mode], "agents": m, "size": size, "release": rel.id,
                           "state": rel.state, "failed": int((df["status"] == "failed").sum()),
                           "errors": sorted({str(e) for e in df["error"].dropna()})}
    for key in ("thin", "thin_payload", "proxy", "agents"):
        out[f"{key}_bytes"] = end[key] - start[key]
        out[f"{key}_x"] = out[f"{key}_bytes"] / size
    out.update({
        "sum_bytes_upstream": int(df["bytes_upstream"].fillna(0).sum()),
        "sum_bytes_peers": int(df["bytes_peers"].fillna(0).sum()),
        "fetch_s": fetched, "done_s": done, "elapsed_s": end["t"] - created,
        "fetch_s_per_agent": sorted(df["fetch_s"].dropna().round(1).tolist()),
        "bound_s": lb["seconds"], "issue_bound_s": lb["issue_seconds"], "bound_formula": lb["formula"],
        "ratio": done / lb["seconds"] if done else None, "fetch_ratio": fetched / lb["seconds"] if fetched else None,
        "cpu_busy": (end["cpu_busy"] - start["cpu_busy"]) / max(1.0, end["cpu_total"] - start["cpu_total"]),
        "proxy_counters": counters})
    return out


# -- output ---------------------------------------------------------------------------------------

def _num(value: float | None, fmt: str, width: int) -> str:
    return "-".rjust(width) if value is None else format(value, fmt).rjust(width)


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nM = {args.agents} agents, F = {args.size_mib} MiB, thin link {args.thin_mbit:g} Mbit/s, "
          f"LAN ports {args.lan_mbit:g} Mbit/s each way (U_proxy = U_agent = D_agent)")
    print(" mode                thin link (payload)  proxy->LAN  agents->LAN    fetch     done    bound"
          "  done/bound  fetch/bound  machine cpu")
    for r in results:
        proxy = "(forwards)" if r["mode"] == "a" else f"{r['proxy_x']:7.2f}xF"
        print(f" ({r['mode']}) {r['name']:<15} {r['thin_x']:6.2f}xF ({r['thin_payload_x']:5.2f}xF)  {proxy:>10}  "
              f"{r['agents_x']:9.2f}xF {_num(r['fetch_s'], '.1f', 7)}s {_num(r['done_s'], '.1f', 7)}s "
              f"{r['bound_s']:7.1f}s  {_num(r['ratio'], '.2f', 9)}  {_num(r['fetch_ratio'], '.2f', 10)}   "
              f"{r['cpu_busy'] * 100:8.0f}%")
        if r["state"] != "done":
            print(f"     ^ {r['state'].upper()} after {r['elapsed_s']:.0f}s: {r['failed']}/{r['agents']} targets "
                  f"failed ({'; '.join(r['errors'])[:300]}); its bytes are those moved until then")
    print("\n lower bounds:")
    for r in results:
        print(f"  ({r['mode']}) {r['bound_formula']}")
    print("\n cross-checks (the release's own per-target figures, the proxy's cache counters, channel losses):")
    for r in results:
        pc = r["proxy_counters"]
        extra = "" if not pc else (f"; proxy counted from_upstream {pc['bytes_from_upstream'] / r['size']:.2f}xF, "
                                   f"served {pc['bytes_served'] / r['size']:.2f}xF, hits {pc['hits']:.0f}, "
                                   f"misses {pc['misses']:.0f}, coalesced {pc['coalesced']:.0f}")
        print(f"  ({r['mode']}) agents got {r['sum_bytes_upstream'] / r['size']:.2f}xF from upstream, "
              f"{r['sum_bytes_peers'] / r['size']:.2f}xF from peers{extra}; "
              f"agents' channels lost {r['channel_losses']} times")
        print(f"      fetch_s per agent: {r['fetch_s_per_agent']}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=20, help="M, agent processes (default 20, at most 200)")
    ap.add_argument("--size-mib", type=int, default=200, help="F, the artifact's size (default 200)")
    ap.add_argument("--thin-mbit", type=float, default=20, help="master <-> proxy link, each way (default 20)")
    ap.add_argument("--lan-mbit", type=float, default=1000, help="every LAN port, each way (default 1000)")
    ap.add_argument("--modes", default="a,b,c", help="a subset of a,b,c (default all three)")
    ap.add_argument("--every", type=float, default=5, help="seconds between progress lines (default 5)")
    ap.add_argument("--master-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `zy master` (repeatable, e.g. --master-arg=--dead-after=60)")
    ap.add_argument("--agent-arg", action="append", default=[], metavar="ARG", help="extra argument for `zy agent`")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs, state) and say where")
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        ap.error("--modes takes a comma-separated subset of a,b,c")
    if not 1 <= args.agents <= 200:
        ap.error("--agents must be 1..200")
    if args.thin_mbit <= 0 or args.lan_mbit <= 0 or args.size_mib < 1:
        ap.error("--thin-mbit, --lan-mbit and --size-mib must be positive")
    return args


def run_all(args: argparse.Namespace, root: Path, results: list[dict[str, Any]]) -> None:
    topo = Topology()
    fleet = LocalFleet(root)
    try:
        net = build_net(topo, args.agents, args.thin_mbit, args.lan_mbit)
        start_master(fleet, net, args.master_arg)
        print(f"master in {net.master_ns} ({net.master_addr}), proxy {net.proxy_up} / {net.proxy_lan}, "
              f"{args.agents} agent namespaces on {Lan.PREFIX}.0/24", flush=True)
        art = make_artifact(fleet, args.size_mib * MIB)
        for mode in args.modes:
            results.append(run_mode(mode, fleet, net, art, args))
            r = results[-1]
            print(f"  ({mode}) {r['state']} after {r['elapsed_s']:.1f}s: thin {r['thin_x']:.2f}xF, "
                  f"proxy->LAN {r['proxy_x']:.2f}xF, agents->LAN {r['agents_x']:.2f}xF", flush=True)
    except BaseException:
        print(fleet.logs()[-8000:], file=sys.stderr)
        raise
    finally:
        fleet.close()
        topo.close()


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0 or shutil.which("tc") is None:
        sys.exit("release: needs root, iproute2 and tc (scripts/setup.sh installs them)")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks: processes and namespaces go

    signal.signal(signal.SIGTERM, stop)
    results: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="zy-release-"))
    try:
        run_all(args, root, results)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        if results:  # what was measured before a failure or Ctrl-C is still shown
            print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}, "modes": results}, indent=1) + "\n")
        print(f"wrote {args.json}")

if __name__ == "__main__":
    main()
