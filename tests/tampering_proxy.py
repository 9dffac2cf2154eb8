"""A compromised relay, simulated for tests: a real `zy proxy` whose relay alters, forges or
replays what it relays, so tests can show that agents and master reject it. Test-only: the
production relay has no tampering in it: this launcher runs `zy proxy` with a relay subclass
(proxy.cli.main's ``relay_class``) that wraps the relay's two data paths.

    python tests/tampering_proxy.py MODE PYTHON -m hcsdk.cli proxy ARGS...

(what ``LocalFleet.start_proxy(wrap=[sys.executable, THIS, MODE])`` runs). It parses the proxy's
arguments as `zy proxy` does and runs its main with the tampering relay; the proxy's restart
after enrolling re-executes this same command line (without the join token), so the wrapper
stays on.

Modes: alter-command, alter-result, forge-command, forge-result, replay-command, replay-result
(or empty: an honest relay).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from proxy.relay import Relay

MODES = ("", "alter-command", "alter-result", "forge-command", "forge-result", "replay-command", "replay-result")


class Tamper:
    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown tamper mode {mode!r} (one of {', '.join(m for m in MODES if m)})")
        self.mode = mode

    def down(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        if msg.get("t") != "task" or not self.mode.endswith("-command"):
            return [msg]
        if self.mode == "alter-command":
            evil = copy.deepcopy(msg)
            evil["p"]["args"]["script"] = str(evil["p"]["args"].get("script", "")) + "; echo tampered"
            return [evil]
        if self.mode == "forge-command":
            forged = copy.deepcopy(msg)
            forged["taskid"] = msg["taskid"] + "-forged"
            forged["p"]["args"] = {"script": "echo forged > /tmp/zy-forged-$ZY_UUID"}
            forged["m"] = "0" * 64
            return [forged, msg]
        return [msg, copy.deepcopy(msg)]  # replay-command

    def up(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        if msg.get("t") not in ("out", "done") or not self.mode.endswith("-result"):
            return [msg]
        if self.mode == "alter-result" and msg["t"] == "out":
            evil = copy.deepcopy(msg)
            evil["p"]["data"] = "tampered\n"
            return [evil]
        if self.mode == "alter-result" and msg["t"] == "done" and msg.get("p", {}).get("out"):
            evil = copy.deepcopy(msg)  # a short task's output, folded into its done
            evil["p"]["out"] = [["stdout", "tampered\n"]]
            return [evil]
        if self.mode == "forge-result" and msg["t"] == "out":
            forged = {"t": "done", "uuid": msg["uuid"], "cmd": msg["cmd"], "taskid": msg["taskid"], "seq": 999,
                      "p": {"status": "ok", "exit_code": 0, "started_at": None, "finished_at": None}, "m": "0" * 64}
            fake_out = {**copy.deepcopy(msg), "seq": 998, "m": "f" * 64}
            fake_out["p"]["data"] = "forged\n"
            return [fake_out, forged, msg]
        if self.mode == "replay-result":
            return [msg, copy.deepcopy(msg)]
        return [msg]


class TamperingRelay(Relay):
    """The proxy's relay with what it relays altered by :attr:`tamper`: every message down to a
    client (:meth:`Relay.deliver`) and every client's message up (:meth:`Relay.forward`), as
    the old ``zy proxy --tamper`` did; the relay's own messages (bye, stats) are left alone."""

    tamper = Tamper("")

    def deliver(self, uuid: str, msg: dict[str, Any]) -> None:
        for out in self.tamper.down(msg):
            super().deliver(uuid, out)

    def forward(self, msg: dict[str, Any]) -> None:
        for out in self.tamper.up(msg):
            super().forward(out)


def main(argv: list[str]) -> int:
    mode, command = argv[0], argv[1:]
    if command[1:4] != ["-m", "hcsdk.cli", "proxy"]:
        raise SystemExit(f"usage: tampering_proxy.py MODE PYTHON -m hcsdk.cli proxy ARGS (got {command!r})")
    import argparse

    import proxy.cli

    TamperingRelay.tamper = Tamper(mode)
    parser = argparse.ArgumentParser(prog="zy")
    proxy.cli.register(parser.add_subparsers())
    sys.argv = ["zy", *command[3:]]  # as `python -m hcsdk.cli` would see it (see running_as)
    return proxy.cli.main(parser.parse_args(sys.argv[1:]), relay_class=TamperingRelay)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
