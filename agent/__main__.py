"""``python -m agent``: the agent program on its own (what the zipapp and the one-file build
run). ``python -m agent [options]`` is ``zy agent [options]``; ``--zy-worker`` starts the plugin
worker process instead (the agent starts it so, from whatever form the agent was installed in)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--zy-worker"]:
        from .worker_child import main as worker_main

        return worker_main()
    import argparse

    from .cli import register

    parser = argparse.ArgumentParser(prog="zy-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    if argv[:1] != ["agent"]:
        argv = ["agent", *argv]
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
