"""A compromised relay, simulated for tests: a real `zy proxy` whose relay alters, forges or
replays what it relays, so tests can show that agents and master reject it. Test-only: the
production relay has no hook for this; this launcher wraps it.

    python tests/tampering_proxy.py MODE PYTHON -m hcsdk.cli proxy ARGS...

(what ``LocalFleet.start_proxy(wrap=[sys.executable, THIS, MODE])`` runs). It replaces the relay
class the proxy builds and runs the proxy's normal main; the proxy's restart after enrolling
re-executes this same command line (without the join token), so the wrapper stays on.

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
    """The proxy's relay with every message down (to a client) and up (to the master) passed
    through :attr:`tamper`."""

    tamper = Tamper("")

    def _deliver(self, uuid: str, msg: dict[str, Any]) -> None:
        for out in self.tamper.down(msg):
            super()._deliver(uuid, out)

    def _up(self, msg: dict[str, Any]) -> None:
        for out in self.tamper.up(msg):
            super()._up(out)


def main(argv: list[str]) -> int:
    mode, command = argv[0], argv[1:]
    if command[1:3] != ["-m", "hcsdk.cli"]:
        raise SystemExit(f"usage: tampering_proxy.py MODE PYTHON -m hcsdk.cli proxy ARGS (got {command!r})")
    import proxy.server
    from hcsdk.cli import main as zy

    TamperingRelay.tamper = Tamper(mode)
    proxy.server.Relay = TamperingRelay  # type: ignore[attr-defined]
    sys.argv = ["zy", *command[3:]]  # as `python -m hcsdk.cli` would see it (see running_as)
    return zy()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
