"""Agent builds installed by online updates, under ``<state>/builds/``, and which one is current.

A new build takes over in place, but the service that starts the agent (systemd, a container,
an init script) still names the program first installed. ``builds/current.json`` records the
build that took over last; an agent started as anything else re-executes itself as that build
(once: ``ZY_BUILD_SWITCHED`` stops loops), so an update survives restarts and reboots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

from hcsdk.common.jointoken import strip_join_args

from .jsonfile import write_json
from .worker_parent import launcher

log = logging.getLogger("zy.agent.builds")
SWITCHED = "ZY_BUILD_SWITCHED"


class BuildError(Exception):
    """A build that cannot be run here."""


def build_command(build: Path) -> list[str]:
    """How to run a build: an executable (the one-file build) or a zipapp (needs a Python)."""
    with open(build, "rb") as fh:
        head = fh.read(4)
    if head == b"\x7fELF":
        return [str(build)]
    if zipfile.is_zipfile(build):
        python = shutil.which("python3") if getattr(sys, "frozen", False) else sys.executable
        if not python:
            raise BuildError("the build is a zipapp and this host has no python3 to run it")
        return [python, str(build)]
    raise BuildError("the build is neither an executable (ELF) nor a zipapp")


def agent_options() -> list[str]:
    """This agent's own options, for the new build (``zy agent OPTIONS`` or ``zy-agent OPTIONS``),
    without a previous ``--handover`` and without the join token (an enrolled agent never needs it
    again, and a new build must not carry it into its own command line)."""
    argv = strip_join_args(sys.argv[1:])
    if argv[:1] == ["agent"]:
        argv = argv[1:]
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--handover":
            skip = True
        elif not arg.startswith("--handover="):
            out.append(arg)
    return out


def own_build(root: Path) -> Path | None:
    """The build under ``root/builds`` this process runs from, if it is one."""
    program = Path(launcher()[-1]).resolve()
    builds = (root / "builds").resolve()
    return program if builds in program.parents else None


def record_current(root: Path, build: Path) -> dict[str, Any] | None:
    """Make ``build`` the one agents start as; returns what was current before."""
    pointer = root / "builds" / "current.json"
    previous = read_current(root)
    digest = hashlib.sha256(build.read_bytes()).hexdigest()
    write_json(pointer, {"path": str(build), "sha256": digest})
    return previous


def restore_current(root: Path, previous: dict[str, Any] | None) -> None:
    pointer = root / "builds" / "current.json"
    if previous is None:
        pointer.unlink(missing_ok=True)
    else:
        write_json(pointer, previous)


def read_current(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / "builds" / "current.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("path"), str) else None


def switch_to_current(root: Path) -> None:
    """At start: become the current build if this process is another program. Does not return
    when it switches. A missing or damaged build is logged and this program carries on."""
    current = read_current(root)
    if current is None or os.environ.get(SWITCHED):
        return
    build = Path(current["path"])
    if own_build(root) == build.resolve():
        return
    try:
        if hashlib.sha256(build.read_bytes()).hexdigest() != current.get("sha256"):
            raise BuildError("its SHA-256 does not match the one recorded when it took over")
        argv = [*build_command(build), *agent_options()]
    except (OSError, BuildError) as exc:
        log.error("not switching to the updated build %s: %s", build, exc)
        return
    log.info("switching to the updated build %s", build)
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[SWITCHED] = "1"
    os.execv(argv[0], argv)


def prune(root: Path, keep: set[Path]) -> None:
    """Remove builds other than ``keep`` (their directories)."""
    builds = root / "builds"
    wanted = {p.resolve().parent for p in keep}
    for entry in builds.iterdir() if builds.is_dir() else []:
        if entry.is_dir() and entry.resolve() not in wanted:
            shutil.rmtree(entry, ignore_errors=True)
