"""What the `zy` lifecycle commands (plugins, agents, schedule, series, artifact) share: the
``--targets`` and ``--output`` options, and one table (or CSV, or JSON lines) per DataFrame."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["TARGETS_HELP", "Subcommands", "add_output", "client", "failed", "show", "stderr_console", "targets"]

TARGETS_HELP = "a uuid or hostname, a glob ('web-*'), a label selector ('label:role=web'), or a comma-separated list"


class Subcommands(Protocol):
    """What a ``register(sub)`` uses of ``parser.add_subparsers()``: argparse names that
    object's class only privately (``_SubParsersAction``)."""

    @property
    def add_parser(self) -> Callable[..., argparse.ArgumentParser]: ...


def add_output(p: argparse.ArgumentParser, default: str = "table") -> None:
    p.add_argument("--output", choices=["table", "csv", "json"], default=default, help=f"(default {default})")


def targets(text: str) -> Any:
    """``-t`` as the SDK takes it: a comma-separated list becomes a list (a label selector's
    commas stay)."""
    if "," in text and not text.startswith("label:"):
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def client() -> Any:
    from hcsdk._client import Client

    return Client()


def show(df: Any, output: str) -> None:
    if output == "csv":
        df.to_csv(sys.stdout)
        return
    if output == "json":
        print(df.to_json(orient="records", lines=True, date_format="iso"))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    for col in df.columns:
        table.add_column(str(col), overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*[escape("" if v is None or v != v else ", ".join(map(str, v)) if isinstance(v, list) else str(v))
                        for v in row])
    Console().print(table)


def failed(df: Any) -> int:
    """The exit status: 1 when a row's status is not ok."""
    from hcsdk.protocol.tasks import TaskStatus

    return 1 if "status" in df.columns and (df["status"] != TaskStatus.OK.value).any() else 0


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
