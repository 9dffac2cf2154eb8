"""The magics in a real Jupyter kernel: widgets in the display, throttled updates, and an
interrupt that cancels the run on the master."""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from fleet import Fleet, wait_for
from hcsdk.localfleet import pid_alive


class Kernel:
    def __init__(self, env: dict[str, str]):
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 60) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        msg_id = self.kc.execute(code)
        return self.collect(msg_id, timeout)

    def collect(self, msg_id: str, timeout: float = 60) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        messages: list[dict[str, Any]] = []
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                kinds = [m["msg_type"] for m in messages]
                raise AssertionError(f"no idle status within {timeout}s; got {kinds}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = self.kc.get_shell_msg(timeout=timeout)
        return reply["content"], messages

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _text(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")


@pytest.fixture(scope="module")
def kernel(fleet4: Fleet) -> Iterator[Kernel]:
    env = {**os.environ, "ZY_CONFIG": str(fleet4.config_path)}
    k = Kernel(env)
    reply, _ = k.execute("%load_ext kernel_ext\n%zyconnect")
    assert reply["status"] == "ok", reply
    try:
        yield k
    finally:
        k.close()


def test_zyrun_shows_a_live_widget_and_a_final_text_line(kernel: Kernel) -> None:
    # a chatty run: 3 targets x 40 lines, each its own output event, over about 2 seconds
    reply, msgs = kernel.execute("%%zyrun -t web-* -o r\nfor i in $(seq 40); do echo line $i; sleep 0.05; done")
    assert reply["status"] == "ok", reply
    displays = [m for m in msgs if m["msg_type"] == "display_data"]
    assert displays and "application/vnd.jupyter.widget-view+json" in displays[0]["content"]["data"]
    updates = [m for m in msgs if m["msg_type"] == "update_display_data"]
    assert updates and "3/3 done (ok 3)" in updates[-1]["content"]["data"]["text/plain"]
    results = [m for m in msgs if m["msg_type"] == "execute_result"]
    assert results and "text/html" in results[0]["content"]["data"]  # the DataFrame
    # 120 output events arrived; throttled rendering sends far fewer widget updates, yet some
    # arrive while the run is going (not only at the end)
    comm_updates = [m for m in msgs if m["msg_type"] == "comm_msg"]
    assert 6 <= len(comm_updates) < 100, len(comm_updates)
    reply, msgs = kernel.execute("print(len(r), r['stdout'].str.count('line').tolist())")
    assert _text(msgs).strip() == "3 [40, 40, 40]"


def test_interrupt_cancels_on_the_master_and_kills_the_commands(kernel: Kernel, tmp_path: Path) -> None:
    script = f'sleep 300 & echo "$$ $!" > {tmp_path}/$ZY_HOSTNAME.pid; wait'
    msg_id = kernel.kc.execute(f"%%zyrun -t web-1,web-2 --timeout 600\n{script}")
    wait_for(lambda: len(list(tmp_path.glob("*.pid"))) == 2, 30, "commands to start on both agents")
    kernel.km.interrupt_kernel()
    reply, msgs = kernel.collect(msg_id, timeout=60)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", (reply, _text(msgs))
    text = _text(msgs)
    assert "zyrun: interrupted" in text and "cancelled" in text, text
    pids = [int(p) for f in tmp_path.glob("*.pid") for p in f.read_text().split()]
    assert len(pids) == 4
    for pid in pids:
        wait_for(lambda p=pid: not pid_alive(p), 20, f"process {pid} to be gone")  # type: ignore[misc]
    if "cancelled run" in text:  # interrupted while following (not while starting): _zy holds it
        reply, msgs = kernel.execute("print(sorted(_zy['status']))")
        assert _text(msgs).strip() == "['cancelled', 'cancelled']"


def test_errors_in_the_kernel_are_one_line(kernel: Kernel) -> None:
    reply, msgs = kernel.execute("%%zyrun -t nowhere\ntrue")
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    assert "unknown target 'nowhere'" in reply["evalue"]
    assert not any("Traceback" in line for line in reply.get("traceback", []))
