"""Writes the runbook notebooks from this one source, so they stay reviewable as code.

    python notebooks/build.py        # rewrites notebooks/*.ipynb (outputs cleared)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def md(text: str) -> nbf.NotebookNode:
    return nbf.v4.new_markdown_cell(text.strip())


def code(text: str, tags: list[str] | None = None) -> nbf.NotebookNode:
    cell = nbf.v4.new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = tags
    return cell


CONNECT = """
import os
if zy_config:
    os.environ["ZY_CONFIG"] = zy_config
%load_ext kernel_ext
%zyconnect
"""

QUICKSTART = [
    md("""
# Quickstart: run a command on a fleet

Connect to the master, look at the inventory, run a command on a set of servers with
`%%zyrun`, and read the results as a pandas DataFrame. Start a local fleet first with
`zy fleet up` (or point `zy_config` at your master's `client.toml`).
"""),
    code("""
# parameters (papermill can override these)
zy_config = ""            # path to a client.toml; empty: ZY_CONFIG / ~/.config/zy/client.toml
targets = "web-*"         # a glob, a label selector, a uuid or hostname
timeout = 30
""", tags=["parameters"]),
    code(CONNECT),
    md("## Inventory\nEvery enrolled agent, with the facts it reported at its last handshake."),
    code("""
inv = %zyinventory
inv[["hostname", "online", "mode", "os", "cpus", "labels"]]
"""),
    md("""
## Run a command
`-t targets` names a variable holding the selector; `-o res` keeps the DataFrame. The live
widget shows progress while it runs.
"""),
    code("""
%%zyrun -t targets -o res --timeout {timeout}
uname -r
uptime
"""),
    md("A label selector picks servers by what they are, not by name:"),
    code("""
%zyrun -t label:role=web,idc=hk --quiet -- echo "{len(inv)} agents in the fleet; this is $ZY_HOSTNAME"
_zy
"""),
    md("""
What `%%zyrun` shows is a readable view: hostname first, a short uuid, output with its line breaks
(long output folded: click to unfold), local times and the status in colour. Underneath, `res` and `_zy`
are plain DataFrames, the columns of `run.to_dataframe()`, to filter, group and plot:
"""),
    code("""
res[["hostname", "status", "exit_code", "duration_s"]]
"""),
    md("## Everywhere, with a failure\n`db-1` fails on purpose; problems are listed first."),
    code("""
%%zyrun -t * -o mixed --quiet
if [ "$ZY_HOSTNAME" = db-1 ]; then echo "disk check failed" >&2; exit 3; fi
echo healthy
"""),
    code("""
import hcsdk

hcsdk.view(mixed)  # the readable view of any results DataFrame (or of a run: run.view())
"""),
    md("Group the results by how they ended:"),
    code("""
summary = mixed.groupby(["status", "exit_code"], dropna=False).size().rename("targets")
summary
"""),
    md("## How long did each target take?"),
    code("""
ax = mixed.sort_values("duration_s").plot.barh(x="hostname", y="duration_s", legend=False,
                                              title="duration per target (s)", figsize=(6, 2.5))
assert len(mixed) == len(inv), "every agent answered"
"""),
]

FLEET_HEALTH = [
    md("""
# Fleet health: disk, memory and load

Collects disk usage of `/`, memory in use and the 1-minute load from every target into one
DataFrame, highlights the hosts over a threshold, and charts them.
"""),
    code("""
# parameters (papermill can override these)
zy_config = ""
targets = "*"
disk_threshold = 80.0     # percent used on /
mem_threshold = 90.0      # percent of memory in use
load_threshold = 2.0      # 1-minute load per CPU
""", tags=["parameters"]),
    code(CONNECT),
    md("""
## Collect
Each target prints one JSON line. The braces of the JSON are doubled (`{{ }}`), because
`{name}` in a `%%zyrun` cell is replaced from the notebook's variables.
"""),
    code("""
%%zyrun -t targets -o raw --quiet --timeout 60
disk=$(df -P / | awk 'NR==2 {{gsub("%", "", $5); print $5}}')
mem=$(awk '/MemTotal/ {{t=$2}} /MemAvailable/ {{a=$2}} END {{printf "%.1f", (t-a)*100/t}}' /proc/meminfo)
load=$(cut -d' ' -f1 /proc/loadavg)
echo "{{\\"disk_pct\\": $disk, \\"mem_pct\\": $mem, \\"load1\\": $load, \\"cpus\\": $(nproc)}}"
"""),
    code("""
import json
import pandas as pd

ok = raw[raw["status"] == "ok"]
metrics = pd.DataFrame([json.loads(s) for s in ok["stdout"]], index=ok.index)
health = pd.concat([ok[["hostname", "uuid"]], metrics], axis=1)
health["load_per_cpu"] = health["load1"] / health["cpus"]
health["over"] = ((health["disk_pct"] > disk_threshold) | (health["mem_pct"] > mem_threshold)
                  | (health["load_per_cpu"] > load_threshold))
unreachable = raw[raw["status"] != "ok"][["hostname", "status", "error"]]
print(f"{len(health)} hosts measured, {int(health['over'].sum())} over a threshold, "
      f"{len(unreachable)} did not answer")
"""),
    md("## Hosts over a threshold are highlighted"),
    code("""
def highlight(row):
    limits = {"disk_pct": disk_threshold, "mem_pct": mem_threshold, "load_per_cpu": load_threshold}
    return ["background-color: #ffcdd2" if col in limits and row[col] > limits[col] else "" for col in row.index]

health.sort_values(["over", "disk_pct"], ascending=False).style.apply(highlight, axis=1).format(precision=1)
"""),
    code("""
ax = health.set_index("hostname")[["disk_pct", "mem_pct"]].plot.bar(
    title="disk and memory in use (%)", figsize=(7, 3), ylim=(0, 100))
ax.axhline(disk_threshold, color="tab:blue", linestyle="--", linewidth=1)
ax.axhline(mem_threshold, color="tab:orange", linestyle="--", linewidth=1)
assert len(health) + len(unreachable) == len(raw)
"""),
]

SAMPLING = [
    md("""
# Sampling: scheduled collection into a time series

The agents run a small probe every few seconds by themselves (they keep the schedule and spool
the samples, so nothing is lost while a link is down); the samples come back as a time-indexed
DataFrame, ready to plot. The same works for any plugin: `java.gc` on a JVM, `tomcat.status`.
"""),
    code("""
# parameters (papermill can override these)
zy_config = ""
targets = "*"
every = "2s"
samples_per_host = 4
"""  , tags=["parameters"]),
    code(CONNECT + """
from hcsdk import Client

client = Client()
"""),
    md("## What each agent can run\nBuilt-in commands, the bundled plugins and any installed online, per host."),
    code("""
plugins = client.plugins.list(targets)
plugins.pivot_table(index="plugin", columns="hostname", values="version", aggfunc="first")
"""),
    md("""
## Schedule a probe
The script prints one JSON object; its keys become the sample's columns.
"""),
    code("""
PROBE = r'''
load=$(cut -d' ' -f1 /proc/loadavg)
mem=$(awk '/MemTotal/ {t=$2} /MemAvailable/ {a=$2} END {printf "%.1f", (t-a)*100/t}' /proc/meminfo)
echo "{\\"load1\\": $load, \\"mem_pct\\": $mem}"
'''
probe = client.schedule("shell", every=every, targets=targets, args={"script": PROBE}, name="runbook-load")
probe.agents()
"""),
    code("""
import time

hosts = int((probe.agents()["status"] == "ok").sum())
deadline = time.monotonic() + 120
while len(series := client.series(probe.name)) < samples_per_host * hosts and time.monotonic() < deadline:
    time.sleep(1)
print(f"{len(series)} samples from {series['hostname'].nunique()} hosts")
series.tail()
"""),
    code("""
ax = series.pivot_table(index=series.index, columns="hostname", values="mem_pct").plot(
    title="memory in use (%)", figsize=(7, 3), marker="o")
assert len(series) >= samples_per_host * hosts, "every host sampled"
"""),
    md("## Stop it\nCancelling stops the agents; the samples stay on the master."),
    code("""
probe.cancel()
client.schedules()
"""),
]

RELEASE = [
    md("""
# Release: a sharded rollout with a health gate

Upload a file to the master (the origin: chunks plus a manifest), then roll it out shard by
shard: each target fetches the chunks (through its proxy's cache), runs `pre`, gets the file
placed atomically at `dest` (the previous one kept), runs `post`, then `health`. Over the
failure threshold the release pauses for you to resume, abort or roll back.
"""),
    code("""
# parameters (papermill can override these)
zy_config = ""
targets = "*"
batch = "50%"             # targets per shard: a count or a share
dest_dir = "/tmp/zy-release-demo"
size_mib = 6
max_failures = 0
""", tags=["parameters"]),
    code(CONNECT + """
from hcsdk import Client

client = Client()
"""),
    md("## The artifact\n"
       "Only chunks the master does not have yet travel: run the upload twice and the second sends nothing."),
    code("""
import os, pathlib, tempfile

package = pathlib.Path(tempfile.mkdtemp()) / "app.tgz"
package.write_bytes(os.urandom(size_mib * 2**20))
art = client.artifacts.upload(package)
again = client.artifacts.upload(package)
print(f"{art['name']}: {art['size']} bytes in {art['chunks']} chunks, id {art['id'][:16]}; "
      f"second upload sent {again['uploaded']} bytes")
"""),
    md("## Roll it out\n"
       "`{hostname}` in `dest` is each target's own (handy when several agents share a disk, as here)."),
    code("""
rel = client.release(
    art["id"], targets, dest=dest_dir + "/{hostname}/app.tgz", batch=batch, max_failures=max_failures,
    pre=f"mkdir -p {dest_dir}/$ZY_HOSTNAME",
    health=f"test -s {dest_dir}/$ZY_HOSTNAME/app.tgz",
)
rel.wait(timeout=300)
rel
"""),
    code("""
progress = rel.progress()
progress[["hostname", "shard", "phase", "status", "bytes", "bytes_upstream", "reused", "fetch_s", "duration_s"]]
"""),
    code("""
ax = progress.plot.barh(x="hostname", y="duration_s", title="time per target (s)", legend=False, figsize=(6, 2.5))
assert rel.state == "done" and (progress["status"] == "ok").all(), rel.info["message"]
"""),
    md("## Roll back\n"
       "The previous file comes back on every target the release reached (here there was none: the file goes)."),
    code("""
rel.rollback().wait(timeout=300)
assert rel.state == "rolled_back" and (rel.progress()["status"] == "rolled_back").all(), rel.info["message"]
rel.info["message"]
"""),
]

DR_DRILL = [
    md("""
# Disaster-recovery drill: promote the standby, fail the agents over

The production layout of `docs/deploy.md` in miniature, on this machine: site A runs a PostgreSQL
primary and a master on it; site B ("another cloud") runs a streaming standby of that PostgreSQL and
has a master ready to start on it, with a copy of the cluster key file. The agents were enrolled with
a join token naming both masters' URLs. Then site A dies (master SIGKILLed, PostgreSQL stopped
`immediate`, as a power cut stops them), the standby is promoted, the DR master starts on it, and
every agent must answer a run through it, with its old uuid and credential.

Everything here is a real process: `initdb`, `pg_basebackup`, `pg_ctl promote`, `zy master`, `zy agent`.
"""),
    code("""
# parameters (papermill can override these)
workdir = ""              # where both sites live; empty: a new folder in /tmp
pg_bin = ""               # folder of initdb/pg_ctl/pg_basebackup; empty: the newest /usr/lib/postgresql/*/bin
agents = 4                # agents enrolled at site A
timeout = 120             # seconds any one step may take
""", tags=["parameters"]),
    md("""
## Helpers
`pg(...)` runs a PostgreSQL program (as the `postgres` user when this kernel is root: PostgreSQL refuses
to run as root); `sql(port, query)` asks one server. Whatever this notebook starts is stopped at the end,
or when the kernel exits.
"""),
    code("""
import atexit, json, os, shutil, socket, subprocess, tempfile, time
from pathlib import Path

import pandas as pd
from hcsdk.localfleet import ZY, LocalFleet, Proc, wait_for

PG = Path(pg_bin) if pg_bin else sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1].parent
AS_POSTGRES = os.geteuid() == 0
root = Path(workdir or tempfile.mkdtemp(prefix="zy-dr-drill-"))
root.mkdir(parents=True, exist_ok=True)
if AS_POSTGRES:
    shutil.chown(root, "postgres", "postgres")  # the postgres user keeps its data dirs and sockets here


def pg(*argv: str) -> str:
    cmd = [str(PG / argv[0]), *argv[1:]]
    done = subprocess.run(["runuser", "-u", "postgres", "--", *cmd] if AS_POSTGRES else cmd,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def sql(port: int, query: str) -> str:
    return pg("psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-XAtc", query)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_pg(data: Path, port: int) -> None:
    opts = f"-p {port} -c listen_addresses=127.0.0.1 -k {root}"
    pg("pg_ctl", "-D", str(data), "-l", f"{data}.log", "-o", opts, "-w", "start")


sites: list[LocalFleet] = []


def cleanup() -> None:
    while sites:
        sites.pop().close()
    for data in (root / "pg-primary", root / "pg-standby"):
        if (data / "postmaster.pid").exists():
            try:
                pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass


atexit.register(cleanup)
timings: dict[str, float] = {}
print(f"PostgreSQL from {PG}, everything under {root}")
"""),
    md("""
## Site A's PostgreSQL, and a streaming standby for site B
`pg_basebackup -R` copies the primary and writes `standby.signal` plus the `primary_conninfo` that
keeps the copy streaming. In production the standby is in the other cloud and the replication
connection goes over TLS (`sslmode=verify-full` in `primary_conninfo`); here it is loopback.

Both sites' masters are given the same `--store`: a libpq multi-host URL with
`target_session_attrs=read-write`, which connects to whichever of the two servers accepts writes.
Today that is the primary; after the promotion it is the standby, with nothing to edit.
"""),
    code("""
primary_port, standby_port = free_port(), free_port()
pg("initdb", "-D", str(root / "pg-primary"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions")
start_pg(root / "pg-primary", primary_port)
sql(primary_port, "CREATE DATABASE zy")
pg("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres",
   "-D", str(root / "pg-standby"), "-R", "-X", "stream", "--checkpoint=fast")
start_pg(root / "pg-standby", standby_port)
# one --store for both sites: libpq tries the hosts in turn and takes the one that accepts writes
store = (f"postgresql://postgres@127.0.0.1:{primary_port},127.0.0.1:{standby_port}/zy"
         "?target_session_attrs=read-write")
assert sql(standby_port, "SELECT pg_is_in_recovery()") == "t", "the standby is read-only, replaying"
print(sql(primary_port, "SELECT application_name, state, sync_state FROM pg_stat_replication"))
"""),
    md("""
## Site A's master, and the URL the DR master will have
The first master on an empty store creates the CA, the admin token and the cluster key file; the
operator copies that key file to site B (it, with the store, opens the whole control plane: keep it
as secret as the database). The DR master is not running (it cannot: its PostgreSQL is a read-only
standby), so no join token names it by itself; the token is made with both masters' URLs,
as `zy token create --master https://master-a:8443 --master https://master-dr:8443` makes it.
"""),
    code("""
site_a = LocalFleet(root / "site-a", ["--store", store, "--key-file", str(root / "site-a" / "cluster.key")])
sites.append(site_a)
site_a.start_master()
dr_port = free_port()
dr_url = f"https://127.0.0.1:{dr_port}"
(root / "site-b").mkdir(exist_ok=True)
shutil.copy2(root / "site-a" / "cluster.key", root / "site-b" / "cluster.key")  # the operator's scp
token = site_a.client.create_join_token(ttl=3600, proxies=[site_a.url, dr_url], description="dr drill")
print(f"master A at {site_a.url}; the DR master will listen at {dr_url}")
"""),
    md("""
## The agents: enrolled at site A with that token
Half of them dial the masters directly; the other half sit at a third site behind a proxy, whose
upstreams are both masters (`zy proxy --upstream A --upstream DR`): those agents only ever dial
the proxy, and the proxy fails over.
"""),
    code("""
proxy_c = site_a.start_proxy("proxy-c", upstreams=[site_a.url, dr_url])
names = [f"node-{i}" for i in range(1, agents + 1)]
path = {name: "via proxy-c" if i % 2 else "direct" for i, name in enumerate(names)}
join_file = site_a.join_file(token["token"])
for name in names:
    argv = [*ZY, "agent", "--state-dir", str(site_a.root / "agents" / name), "--hostname", name,
            "--join-file", str(join_file), "--heartbeat", "2", "--dead-after", "8", "--backoff-cap", "2"]
    if path[name] != "direct":
        argv += ["--master", proxy_c]  # enrolls through the proxy, and connects only to it
    site_a.agents[name] = Proc(name, argv, site_a.root / f"agent-{name}.log", site_a.env)
site_a.wait_online(timeout=timeout)
uuids = {name: site_a.uuid_of(name) for name in names}
print(f"{len(uuids)} agents online on master A, {list(path.values()).count('direct')} of them directly")
"""),
    md("""
The SDK (and the `%zy` magics) are given both masters' URLs, as `client.toml`'s `urls` or
`ZY_MASTER=A,B` give them: the admin token and the CA are the same on every master.
"""),
    code("""
%load_ext kernel_ext
ca = str(site_a.root / "master" / "ca.pem")
admin = site_a.admin_token
%zyconnect {site_a.url},{dr_url} --token {admin} --ca {ca}
"""),
    code("""
%%zyrun -t * -o before --quiet
echo "$ZY_HOSTNAME answers"
"""),
    md("""
## Before the disaster: is the standby caught up?
Replication is asynchronous here, so what the primary committed in its last moments may not have
reached the standby (in production: `synchronous_standby_names` makes that zero, at a latency cost).
The drill waits until the standby has replayed everything, so the loss it measures is the masters' alone.
"""),
    code("""
lsn = sql(primary_port, "SELECT pg_current_wal_lsn()")
wait_for(lambda: sql(standby_port, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'") == "t", timeout,
         "the standby to replay the primary's WAL")
print(f"standby replayed up to {lsn}")
"""),
    md("""
## Site A goes dark
The master is SIGKILLed (no goodbye to anyone) and PostgreSQL is stopped `immediate` (no checkpoint,
connections cut), as a lost data centre leaves them. The agents lose their channel and start dialling
the next URL they know: the DR master's, which refuses until it is up.
"""),
    code("""
t0 = time.monotonic()
site_a.master.kill()
pg("pg_ctl", "-D", str(root / "pg-primary"), "-m", "immediate", "-w", "stop")
timings["site A down"] = time.monotonic() - t0
"""),
    md("""
## Promote the standby
`pg_ctl promote` ends recovery: the standby becomes a primary that accepts writes. (Make sure the old
primary stays down, or fence it: two primaries would split the control plane.)
"""),
    code("""
pg("pg_ctl", "-D", str(root / "pg-standby"), "-w", "promote")
assert sql(standby_port, "SELECT pg_is_in_recovery()") == "f"
timings["standby promoted"] = time.monotonic() - t0
"""),
    md("""
## Start the DR master on it
The same `--store` (which now finds the promoted standby) and a copy of the key file: it reads the sealed CA,
admin token and end-to-end key from the store, issues its own server certificate from that CA, and
registers itself. Nothing is copied from site A's data dir.
"""),
    code("""
site_b = LocalFleet(root / "site-b", ["--store", store, "--key-file", str(root / "site-b" / "cluster.key")])
sites.append(site_b)
site_b.start_master(port=dr_port)
timings["DR master listening"] = time.monotonic() - t0
dr_id = (root / "site-b" / "master" / "master.id").read_text().strip()


def held_by_dr() -> int:
    rows = json.loads(subprocess.run([*ZY, "master", "cluster", "--store", store, "--json"],
                                     capture_output=True, text=True, check=True, env=site_b.env).stdout)
    return sum(int(r["agents"]) for r in rows if r["id"] == dr_id)


wait_for(lambda: held_by_dr() == agents + 1, timeout, "every agent and the proxy on the DR master")
timings["every agent on the DR master"] = time.monotonic() - t0
print(subprocess.run([*ZY, "master", "cluster", "--store", store], capture_output=True, text=True,
                     env=site_b.env).stdout)
"""),
    md("""
## Every agent answers through the DR master
The same SDK connection as before: its first URL is gone, so it moves to the next one that answers.
A read goes first: the SDK resends a read anywhere after any network error, but never a request that
changes something (a new run) once it may have reached the dead master, so that one is made after the
SDK has found the DR master. Each agent has connected twice now, same uuid, same credential.
"""),
    code("""
inv = %zyinventory
inv[["hostname", "uuid", "online", "connects"]]
"""),
    code("""
%%zyrun -t * -o after --quiet
echo "$ZY_HOSTNAME answers"
"""),
    code("""
timings["every agent answered a run"] = time.monotonic() - t0
inv = %zyinventory
summary = pd.DataFrame({
    "hostname": names,
    "path": [path[n] for n in names],
    "uuid": [uuids[n][:8] for n in names],
    "same uuid after": [bool((inv.loc[inv["hostname"] == n, "uuid"] == uuids[n]).any()) for n in names],
    "before (master A)": [before.loc[before["hostname"] == n, "status"].iloc[0] for n in names],
    "after (DR master)": [after.loc[after["hostname"] == n, "status"].iloc[0] for n in names],
}).set_index("hostname")
summary
"""),
    md("## How long it took\nSeconds from the moment site A died."),
    code("""
steps = pd.Series(timings, name="seconds since site A died").round(2).to_frame()
steps
"""),
    md("""
## Verdict, and clean-up
The join token made on master A is in the promoted store too: the DR master can enrol new agents
with it. Then everything this notebook started is stopped.
"""),
    code("""
assert sorted(after["hostname"]) == names, after  # the agents, each once (a proxy runs no commands)
assert (summary["after (DR master)"] == "ok").all() and summary["same uuid after"].all(), summary
assert any(t["description"] == "dr drill" for t in site_b.client.join_tokens()), "the store came over"
cleanup()
if not workdir:
    shutil.rmtree(root, ignore_errors=True)
print(f"drill passed: {len(summary)} of {agents} agents answered through the DR master "
      f"{timings['every agent answered a run']:.1f} s after site A died")
"""),
]


def write(name: str, cells: list[nbf.NotebookNode]) -> None:
    for i, cell in enumerate(cells):  # stable ids: rebuilding an unchanged notebook leaves its file unchanged
        cell.id = hashlib.sha1(f"{name}:{i}:{cell.source}".encode()).hexdigest()[:8]
    nb = nbf.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbf.write(nb, HERE / name)


if __name__ == "__main__":
    write("quickstart.ipynb", QUICKSTART)
    write("fleet-health.ipynb", FLEET_HEALTH)
    write("sampling.ipynb", SAMPLING)
    write("release.ipynb", RELEASE)
    write("dr-drill.ipynb", DR_DRILL)
