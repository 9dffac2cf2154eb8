"""Makes tests/data/store-v0/: a master data dir written by the code from before issue 14
(no schema version record), for tests/test_store_upgrade.py.

Run it from a checkout of that code (here /tmp/base, at 52043b6):

    cd /tmp/base && PYTHONPATH=/tmp/base python /work/main/tests/data/make_store_fixture.py OUT

It starts a master and two agents (real processes), runs a command, uploads an artifact and
releases it, creates a join token and a schedule, stops everything and copies what the new
master and one agent need into OUT.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from hcsdk.localfleet import LocalFleet, wait_for


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fl = LocalFleet(root, ["--offline-grace", "5", "--heartbeat", "2"])
        try:
            fl.start_master()
            for name in ("old-1", "old-2"):
                fl.start_agent(name, {"role": "old"})
            fl.wait_online()
            client = fl.client
            run = client.run("echo hello-from-$ZY_HOSTNAME", targets="label:role=old")
            result = run.to_dataframe()
            assert list(result["status"]) == ["ok", "ok"], result
            extra = client.create_join_token(ttl=31536000, description="kept-token")
            art = root / "app.txt"
            art.write_bytes(b"version one\n" * 100)
            artifact = client.artifacts.upload(art)
            (root / "srv").mkdir()
            rel = client.release(artifact["id"], "label:role=old", dest=str(root / "srv" / "{hostname}.txt"),
                                 batch=1)
            rel.wait(timeout=120)
            assert rel.state == "done", rel.info
            client.schedule("echo", every="1s", targets="label:role=old", args={"text": "4"}, name="fourty")
            wait_for(lambda: len(client.series("fourty")) >= 4, what="samples")
            facts = {
                "run_id": run.id, "artifact": artifact["id"], "release": rel.id, "token_id": extra["id"],
                "uuids": {n: fl.uuid_of(n) for n in ("old-1", "old-2")},
            }
        finally:
            fl.close()
        out.mkdir(parents=True)
        ignore = shutil.ignore_patterns("*.lock", "lock", "*-wal", "*-shm", "port")
        shutil.copytree(root / "master", out / "master", ignore=ignore)
        shutil.copytree(root / "agents" / "old-1", out / "agent-old-1", ignore=ignore)
        (out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
