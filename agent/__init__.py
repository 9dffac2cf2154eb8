"""The agent: ``zy agent`` (agent.cli), ``python -m agent`` (the zipapp and one-file builds) and
``zy swarm`` (agent.swarm_cli)."""

import sys as _sys

# httpx/__init__ imports its command-line client (httpx._main), which drags in click, rich and
# pygments (~6 MiB resident per agent) when they are installed. httpx guards that import with
# ``except ImportError``; a None entry in sys.modules makes it raise one, so only `httpx.main`
# (the `httpx` command, which no agent runs) falls back to httpx's stub. Set here, on importing
# the service, not in hcsdk: an SDK user's notebook or script keeps httpx's CLI. Every way of
# starting an agent imports this package before httpx (hcsdk.cli loads its entry points before
# any command runs); a process that imported httpx already keeps what it has. proxy/__init__.py
# does the same.
if "httpx" not in _sys.modules:
    _sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
del _sys
