"""Run by the ipyparallel venv's interpreter (with -P, so `ipyparallel` is not this folder's ipyparallel.py).

    python -P _ipp_client.py CLIENT_JSON N WAIT_TIMEOUT REPEATS

Waits until N engines are registered, then times `DirectView.apply_sync` of a function running
`echo hi` in a subprocess on every engine: warm-up, then REPEATS timed calls. Prints one JSON object.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any


def echo_hi() -> str:
    import subprocess

    return subprocess.check_output(["echo", "hi"]).decode()


def bench(client_json: str, n: int, wait_timeout: float, repeats: int) -> dict[str, Any]:
    ipp = importlib.import_module("ipyparallel")
    rc = ipp.Client(client_json, timeout=60)
    t0 = time.monotonic()
    rc.wait_for_engines(n, timeout=wait_timeout)
    waited = time.monotonic() - t0
    view = rc[:]
    if len(view) != n:
        raise SystemExit(f"{len(view)} engines registered, wanted {n}")

    def once() -> None:
        out = view.apply_sync(echo_hi)
        if len(out) != n or any(o != "hi\n" for o in out):
            raise SystemExit(f"apply_sync: {len(out)} results, wanted {n} x 'hi': {out[:5]}")

    once()  # warm-up
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        samples.append(time.perf_counter() - t)
    pids = view.apply_sync(_getpid)
    rc.close()
    return {"samples": samples, "waited_s": waited, "engine_pids": pids}


def _getpid() -> int:
    import os

    return os.getpid()


def main() -> None:
    client_json, n, wait_timeout, repeats = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(bench(client_json, n, wait_timeout, repeats)), flush=True)


if __name__ == "__main__":
    main()
