"""`zy agent`: registered on the `hcsdk.commands` entry-point group."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from hcsdk.common.errors import JoinTokenError
from hcsdk.common.jointoken import JOIN_ENV, JoinToken, pop_env_token, read_join, reexec_without_join
from hcsdk.common.runtime import tune_gc
from hcsdk.common.sizes import parse_rate
from hcsdk.net.settings import add_channel_options, channel_options


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--label wants KEY=VALUE, got {text!r}")
    return key, value


def _rate(text: str) -> float:
    try:
        return parse_rate(text)  # decimal: 20M is 20,000,000 bytes a second, as it always was
    except ValueError:
        raise argparse.ArgumentTypeError(f"--peer-rate wants bytes a second like 20M, got {text!r}") from None


def _handover(text: str) -> tuple[str, int]:
    taskid, sep, pid = text.rpartition(":")
    if not sep or not taskid or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"--handover wants TASKID:PID, got {text!r}")
    return taskid, int(pid)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "agent", help="run an agent (enrolls once with a join token, then reconnects as the same uuid)",
        description="Run an agent. The first start needs a join token (from `zy token create`): in a file "
        f"(--join-file), in {JOIN_ENV}, or (visible to other users) --join; the identity is kept in --state-dir "
        "and later starts need only that. The token is never passed on to the agent's children or new builds.",
    )
    p.add_argument("--join-file", type=Path, metavar="PATH", help="file holding the join token, for the first start")
    p.add_argument("--join", metavar="TOKEN",
                   help=f"join token on the command line (other users can read it there: prefer --join-file or "
                   f"{JOIN_ENV})")
    p.add_argument("--state-dir", type=Path, default=Path("./state/agent"),
                   help="state directory (default %(default)s)")
    p.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE",
                   help="label reported to the master (repeatable); replaces the saved labels when given")
    p.add_argument("--hostname", help="name to report instead of the system hostname")
    p.add_argument("--master", "--proxy", dest="master", action="append", default=[], metavar="URL",
                   help="master or proxy URL to use instead of the ones in the join token (repeatable: the "
                   "agent starts at a random one, so agents spread, and fails over to the next)")
    add_channel_options(p, "agent")  # --no-http2, --heartbeat, --dead-after, --h2-retry, --backoff-cap
    p.add_argument("--output-cap", type=int, default=8 * 1024 * 1024, metavar="BYTES",
                   help="keep at most this much of each task's stdout and of its stderr (default 8 MiB)")
    p.add_argument("--worker-memory", type=int, default=512, metavar="MIB",
                   help="restart the plugin worker when it grows past this resident size (default 512)")
    p.add_argument("--peer-port", type=int, default=0, metavar="PORT",
                   help="serve release chunks to peers on this port (default: any free one, told to the tracker)")
    p.add_argument("--no-peer", action="store_true",
                   help="never serve chunks to peers (this agent still downloads from them and its proxy)")
    p.add_argument("--peer-uploads", type=int, default=4, metavar="N", help="concurrent uploads to peers (default 4)")
    p.add_argument("--keep-releases", type=int, default=3, metavar="N",
                   help="release files kept under STATE_DIR/releases, newest first (default 3); files placed "
                   "at a destination stay there: the kept copies are what peers are served from")
    p.add_argument("--peer-rate", type=_rate, default=0.0, metavar="BYTES/S",
                   help="upload at most this much a second to peers, e.g. 20M (default: no cap)")
    p.add_argument("--handover", metavar="TASKID:PID", type=_handover, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_main)


#: what _amain returns after a first start has enrolled: start over as an enrolled agent
_RESTART = -1


def _main(args: argparse.Namespace) -> int:
    args.join_env = pop_env_token()  # first: nothing started from here on inherits it
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    if args.handover is None:
        from .builds import switch_to_current

        switch_to_current(args.state_dir)  # an online update installed another build: run that one
    tune_gc()
    code = anyio.run(_amain, args, _can_restart())
    if code == _RESTART:
        # the identity is saved: the new image skips enrollment and never loads what only
        # enrollment needs (cryptography for X25519, ~12 MiB resident)
        reexec_without_join()
    return code


def _can_restart() -> bool:
    """Whether this process is the `zy agent` command line itself (and not, say, a test calling
    the CLI in-process), so replacing it with a fresh copy of itself runs the same agent: `zy agent`,
    `python -m agent`, the zipapp (`python3 zy-agent.pyz`) or the one-file build (`zy-agent`)."""
    if getattr(sys, "frozen", False):
        return bool(sys.executable)
    main = sys.modules.get("__main__")
    own = (getattr(getattr(main, "__loader__", None), "archive", None) is not None  # the zipapp
           or getattr(getattr(main, "__spec__", None), "name", None) == "agent.__main__")
    return (bool(sys.executable) and len(sys.argv) > 1 and (sys.argv[1] == "agent" or own)
            and sys.orig_argv[len(sys.orig_argv) - len(sys.argv) + 1:] == sys.argv[1:])


async def _amain(args: argparse.Namespace, restart: bool = False) -> int:
    from hcsdk.common.identity import StateDir

    state = StateDir(args.state_dir)
    ident = state.load()
    labels = dict(args.label)
    if not ident.enrolled:
        from hcsdk.common import facts as facts
        from hcsdk.net.enroll import EnrollError, enroll

        try:
            text = read_join("zy agent", args.join, args.join_file, args.join_env)
            if not text:
                print(f"zy agent: {args.state_dir} holds no enrollment; start once with --join-file PATH "
                      f"(or {JOIN_ENV}=TOKEN)", file=sys.stderr)
                return 2
            token = JoinToken.decode(text)
            if token.kind != "agent":
                raise JoinTokenError(f"this is a {token.kind} token; an agent needs one from `zy token create`")
            # behind proxies, enrollment goes through them too (--master), not to the token's URLs
            ident = await enroll(state, ident, token, facts.collect(args.hostname), labels, urls=args.master or None,
                                 on_warning=lambda w: print(f"zy agent: warning from the master: {w}",
                                                            file=sys.stderr, flush=True))
        except (JoinTokenError, EnrollError) as exc:
            print(f"zy agent: {exc}", file=sys.stderr)
            return 2
        print(f"zy agent: enrolled as {ident.uuid}", flush=True)
        if restart:
            return _RESTART
    else:
        if labels and labels != ident.labels:
            ident.labels = labels
            state.save(ident)
        if restart and (args.join or args.join_env):  # a unit file that still passes the token: shed it
            print("zy agent: already enrolled; restarting without the join token", flush=True)
            return _RESTART
    from hcsdk.net.channel import Rejected
    from hcsdk.net.settings import ChannelSettings

    from .core import Agent
    from .release.peer import PeerSettings

    if args.master:
        ident.urls = list(args.master)
    settings = ChannelSettings(**channel_options(args))
    print(f"zy agent: {ident.uuid} connecting to {', '.join(ident.urls)}", flush=True)
    try:
        await Agent(state, ident, hostname=args.hostname, settings=settings, output_cap=args.output_cap,
                    worker_memory_mib=args.worker_memory, handover=args.handover, keep_releases=args.keep_releases,
                    peer=None if args.no_peer else PeerSettings(port=args.peer_port, uploads=args.peer_uploads,
                                                                rate=args.peer_rate)).run()
    except ValueError as exc:  # a state dir from an older version
        print(f"zy agent: {exc}", file=sys.stderr)
        return 2
    except Rejected as exc:
        print(f"zy agent: the master refused this agent: {exc}", file=sys.stderr)
        return 3
    return 0
