"""A compromised relay, simulated: ``zy proxy --tamper MODE`` alters, forges or replays what it
relays, so tests can show that agents and master reject it. Never use it for anything else.

Modes: alter-command, alter-result, forge-command, forge-result, replay-command,
replay-result (or empty: an honest relay).
"""

from __future__ import annotations

import copy
from typing import Any

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
