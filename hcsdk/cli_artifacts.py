"""`zy artifact upload|list`: files on the master to release. An upload is resumable (only the
chunks the master lacks travel) and shows a progress bar on stderr."""

from __future__ import annotations

import argparse
from pathlib import Path

from hcsdk.cli_output import Subcommands, add_output, client, show, stderr_console


def register(sub: Subcommands) -> None:
    ar = sub.add_parser("artifact", help="files on the master to release: upload (resumable) and list")
    arsub = ar.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = arsub.add_parser("upload", help="store a file as an artifact (only missing chunks travel)")
    up.add_argument("path", type=Path)
    up.add_argument("--name", help="default: the file's name")
    add_output(up)
    al = arsub.add_parser("list", help="artifacts, newest last")
    add_output(al)
    for q in (up, al):
        q.set_defaults(func=_cmd_artifact)


def _cmd_artifact(args: argparse.Namespace) -> int:
    import pandas as pd

    artifacts = client().artifacts
    if args.action == "list":
        show(artifacts.list(), args.output)
        return 0
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True, console=stderr_console()) as bar:
        task = bar.add_task(f"upload {args.path.name}", total=None)
        info = artifacts.upload(args.path, name=args.name,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    show(pd.DataFrame([info]), args.output)
    return 0
