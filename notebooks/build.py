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
