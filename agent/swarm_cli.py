"""`zy swarm`: registered on the `hcsdk.commands` entry-point group (see agent.swarm)."""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import sys
from pathlib import Path

import anyio

from hcsdk.common.jointoken import JOIN_ENV, pop_env_token, read_join, reexec_without_join, running_as
from hcsdk.common.runtime import tune_gc
from hcsdk.net.settings import add_channel_options, channel_options


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "swarm", help="run N real agents in one process, to load a master or proxy (like Salt's minionswarm)",
        description="Run N agents in one process, each with its own identity, credential and TLS connection, "
        "built from the real agent code (see `pydoc agent.swarm` for what they share). Identities are kept in "
        "--state-dir, so the next run reconnects the same agents without enrolling them again. "
        f"While some are not enrolled yet it needs a join token: in a file (--join-file), in {JOIN_ENV}, or "
        "(visible to other users) --join; once they are, a swarm given it in either of the last two ways restarts "
        "(same pid) without it. Stop with Ctrl-C or SIGTERM.",
    )
    p.add_argument("--join-file", type=Path, metavar="PATH",
                   help="file holding the join token, needed while some agents are not enrolled yet")
    p.add_argument("--join", metavar="TOKEN",
                   help=f"join token on the command line (other users can read it there: prefer --join-file or "
                   f"{JOIN_ENV})")
    p.add_argument("--agents", type=int, required=True, metavar="N", help="how many agents to run")
    p.add_argument("--proxy", "--master", dest="urls", action="append", default=[], metavar="URL",
                   help="master or proxy URL instead of the token's (repeatable: agents spread over them)")
    p.add_argument("--state-dir", type=Path, default=Path("./state/swarm"),
                   help="where the agents' identities are kept (default %(default)s)")
    p.add_argument("--name", default="swarm", help="hostname prefix: agents report NAME-00000, ... (default swarm)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label for every agent")
    p.add_argument("--ramp", type=float, default=500.0, metavar="PER_S",
                   help="start at most this many agents per second (default 500)")
    p.add_argument("--enroll-concurrency", type=int, default=32, metavar="N",
                   help="enrollments in flight at once (default 32)")
    p.add_argument("--no-spread-source", action="store_true",
                   help="do not bind each agent to its own 127.x.y.z source address (done only for loopback URLs)")
    add_channel_options(p, "swarm")  # --no-http2, --heartbeat, --dead-after
    p.add_argument("--status-every", type=float, default=5.0, metavar="S",
                   help="print a status line this often, when it changed (default 5)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_main)


def _labels(texts: list[str]) -> dict[str, str]:
    labels = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValueError(f"--label wants KEY=VALUE, got {text!r}")
        labels[key] = value
    return labels


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


#: what _amain returns once every agent is enrolled and the token must be shed: start over without it
_RESTART = -1


def _main(args: argparse.Namespace) -> int:
    args.join_env = pop_env_token()  # first: no command the agents run inherits it
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        labels = _labels(args.label)
    except ValueError as exc:
        print(f"zy swarm: {exc}", file=sys.stderr)
        return 2
    if args.agents < 1:
        print("zy swarm: --agents must be at least 1", file=sys.stderr)
        return 2
    hard = _raise_fd_limit()
    if hard < args.agents + 64:
        print(f"zy swarm: the open-file limit is {hard}; {args.agents} agents need more (raise `ulimit -Hn`)",
              file=sys.stderr)
        return 2
    tune_gc()
    code = anyio.run(_amain, args, labels, running_as("swarm"), backend_options=_loop_options())
    if code == _RESTART:
        reexec_without_join()
    return code


def _loop_options() -> dict[str, bool]:
    try:
        import uvloop  # noqa: F401  - a faster event loop where it is installed
    except ImportError:
        return {}
    return {"use_uvloop": True}


async def _amain(args: argparse.Namespace, labels: dict[str, str], restart: bool = False) -> int:
    from .swarm import AgentSwarm, SwarmError

    def join() -> str | None:
        # read only when some agent needs it (so --join warns only then, as `zy agent` does)
        return read_join("zy swarm", args.join, args.join_file, args.join_env)

    swarm = AgentSwarm(args.state_dir, args.agents, join,
                  args.urls, labels, name=args.name, spread_source=not args.no_spread_source,
                  **channel_options(args))  # http2, heartbeat, dead_after
    try:
        enrolled = await swarm.enroll_missing(args.enroll_concurrency)
    except SwarmError as exc:
        print(f"zy swarm: {exc}", file=sys.stderr)
        return 2
    if restart and (args.join or args.join_env):  # the token in argv or environ: shed it before running
        print(f"zy swarm: {args.agents} agents enrolled ({enrolled} newly); restarting without the join token",
              flush=True)
        return _RESTART
    print(f"zy swarm: {args.agents} agents ({enrolled} newly enrolled), starting at {args.ramp:g}/s", flush=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(swarm.start_all, tg, args.ramp)
        tg.start_soon(swarm.report, args.status_every)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                print(f"zy swarm: stopping {len(swarm.agents)} agents", flush=True)
                tg.cancel_scope.cancel()
                break
    return 0
