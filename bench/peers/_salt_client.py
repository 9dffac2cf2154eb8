"""Run by the salt venv's interpreter (with -P, so `salt` is not this folder's salt.py): the LocalClient side.

    python -P _salt_client.py ping MASTER_CONFIG N TIMEOUT   # wait until N minions answer test.ping
    python -P _salt_client.py bench MASTER_CONFIG N REPEATS  # warm-up + REPEATS timed cmd.run 'echo hi'

Prints one JSON object on stdout.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any

# 60 s like hcsdk's run(timeout=60): the call still returns as soon as every minion has answered, and no
# find_job round is sent in between, which would only add load
TIMEOUT = 60


def client(master_config: str) -> Any:
    return importlib.import_module("salt.client").LocalClient(c_path=master_config)


def ping(master_config: str, n: int, timeout: float) -> dict[str, Any]:
    """test.ping every minion, one call at a time with a long timeout, until all n answer. Short timeouts in a
    tight loop are what not to do: each call that times out sends find_job to the minions that did not answer,
    every job is a new process on the minion, and a loaded master then falls further behind."""
    local = client(master_config)
    deadline = time.monotonic() + timeout
    answered: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            answered = local.cmd("*", "test.ping", timeout=30) or {}
        except Exception as exc:  # SaltClientError: a master still busy authenticating minions times out
            print(f"test.ping: {exc}", file=sys.stderr)
        if sum(1 for v in answered.values() if v is True) >= n:
            break
        time.sleep(10)
    return {"answered": sorted(k for k, v in answered.items() if v is True)}


def bench(master_config: str, n: int, repeats: int) -> dict[str, Any]:
    local = client(master_config)

    def once() -> None:
        ret = local.cmd("*", "cmd.run", ["echo hi"], timeout=TIMEOUT)
        ok = [k for k, v in ret.items() if v == "hi"]
        if len(ok) != n:
            raise SystemExit(f"LocalClient: {len(ok)} of {n} minions returned 'hi': {ret}")

    once()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        samples.append(time.perf_counter() - t0)
    return {"samples": samples}


def main() -> None:
    mode, master_config, n, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    result = ping(master_config, n, float(arg)) if mode == "ping" else bench(master_config, n, int(arg))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
