"""The main job on the embedded default: a local master (SQLite, its own CA) and three agents
as real processes, an inventory, and a fan-out whose results land in a DataFrame.

    .venv/bin/python scripts/quickstart.py [--keep]

State goes to ./state/quickstart (made afresh each run). With --keep the fleet stays up
until Ctrl-C, and the line it prints tells how to point `zy` or hcsdk at it.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pandas as pd

from hcsdk.localfleet import LocalFleet


def main() -> None:
    ap = argparse.ArgumentParser(description="run the hcsdk quickstart on a local fleet")
    ap.add_argument("--keep", action="store_true", help="keep the fleet running until Ctrl-C")
    ap.add_argument("--root", type=Path, default=Path("state/quickstart"))
    args = ap.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    pd.set_option("display.width", 160)
    pd.set_option("display.max_colwidth", 40)

    with LocalFleet(args.root.resolve()) as fleet:
        fleet.start_master()
        print(f"master: {fleet.url}  (data in {fleet.root / 'master'})")
        for name, role in (("web-1", "web"), ("web-2", "web"), ("db-1", "db")):
            fleet.start_agent(name, {"role": role}, fast=False)
        fleet.wait_online()
        client = fleet.client
        print("\n== inventory")
        print(client.inventory()[["hostname", "uuid", "os", "online", "mode", "labels"]].to_string(index=False))

        print("\n== run: uname -r; uptime on every agent")
        t0 = time.perf_counter()
        df = client.run("uname -r; uptime", targets=fleet.client.inventory(), timeout=30).to_dataframe()
        print(f"({len(df)} results in {time.perf_counter() - t0:.2f}s)")
        print(df[["hostname", "status", "exit_code", "duration_s", "stdout"]].to_string(index=False))

        print("\n== run everywhere; db-1 fails on purpose (commands see ZY_HOSTNAME, ZY_UUID, ZY_TASKID)")
        df = client.run('[ "$ZY_HOSTNAME" != db-1 ] || exit 3', targets="*", timeout=30).to_dataframe()
        print(df.groupby(["status", "exit_code"]).size().rename("targets").to_string())

        print("\n== streaming events")
        run = client.run("for i in 1 2 3; do echo tick $i; sleep 0.3; done", targets="web-1", timeout=30)
        for event in run.events():
            print(f"  {event.hostname:6} {event.kind:6} seq={event.seq:<3} {event.data.strip() or event.status or ''}")

        if args.keep:
            print(f"\nfleet is up: export ZY_CONFIG={fleet.config_path}   (Ctrl-C to stop)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    print("\nquickstart: ok")


if __name__ == "__main__":
    main()
