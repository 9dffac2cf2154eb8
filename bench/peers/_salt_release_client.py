"""Run by the salt venv's interpreter (with -P, so `salt` is not this folder's salt.py): `cp.cache_file` timed.

    python -P _salt_release_client.py MASTER_CONFIG N SALT_URL TIMEOUT

One `LocalClient().cmd('*', 'cp.cache_file', [SALT_URL], timeout=TIMEOUT)`: it returns once every minion has the
file in its cache (or the timeout passed). Prints one JSON object on stdout: when the call started and returned
(epoch seconds, to line up with the caller's clock), how long it took, and what each minion returned (the path of
its cached copy, or False).
"""

from __future__ import annotations

import importlib
import json
import sys
import time


def main() -> None:
    master_config, n, url, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    local = importlib.import_module("salt.client").LocalClient(c_path=master_config)
    # a timeout far above the transfer: the call still returns as soon as every minion has answered, and no
    # find_job round is sent in between (each is a new process on every minion)
    t_start, p0 = time.time(), time.perf_counter()
    ret = local.cmd("*", "cp.cache_file", [url], timeout=timeout) or {}
    seconds = time.perf_counter() - p0
    print(json.dumps({"t_start": t_start, "t_end": time.time(), "seconds": seconds, "expected": n,
                      "returns": ret}), flush=True)


if __name__ == "__main__":
    main()
