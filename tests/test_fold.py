"""A short task is one message each way (issue 16): the agent folds its output into the done, the
store keeps one event, the SDK's stream (``folded=1``) gets one line, and a reader that does not
ask for folded events still gets the out lines, as an older agent sent them."""

from __future__ import annotations

import sqlite3
import ssl
import time
from typing import Any

import httpx
import pytest

from fleet import Fleet
from hcsdk.protocol.wire import loads


def _lines(fleet: Fleet, run_id: str, **query: Any) -> list[dict[str, Any]]:
    ca = ssl.create_default_context(cafile=str(fleet.root / "master" / "ca.pem"))
    with httpx.Client(base_url=fleet.url, verify=ca, timeout=30,
                      headers={"authorization": f"Bearer {fleet.admin_token}"}) as http:
        body = http.get(f"/api/v1/runs/{run_id}/events", params={"after": 0, **query}).text
    return [loads(line) for line in body.splitlines() if line.strip()]


def test_a_short_task_is_one_stored_event_with_its_output(fleet5: Fleet) -> None:
    run = fleet5.client.run("echo hi; echo oops >&2", targets="web-1", timeout=30)
    df = run.to_dataframe()
    assert (df.loc[0, "status"], df.loc[0, "stdout"], df.loc[0, "stderr"]) == ("ok", "hi\n", "oops\n")
    again = fleet5.client.run("echo hi", targets="web-1", timeout=30)
    assert [e.kind for e in again.events()] == ["start", "stdout", "done"]  # as before folding
    db = sqlite3.connect(fleet5.root / "master" / "master.db")
    rows = db.execute("SELECT kind, seq, data FROM events WHERE run_id=?", (run.id,)).fetchall()
    assert [(kind, seq) for kind, seq, _ in rows] == [("done", 3)], rows
    folded = sorted(tuple(p) for p in loads(rows[0][2])["out"])
    assert folded == [("stderr", "oops\n"), ("stdout", "hi\n")]


def test_readers_that_do_not_ask_for_folded_events_get_out_lines(fleet5: Fleet) -> None:
    run = fleet5.client.run("echo one", targets="web-2", timeout=30)
    run.wait()
    plain = [r for r in _lines(fleet5, run.id) if r.get("kind") != "end"]
    assert [(r["kind"], r["seq"]) for r in plain] == [("out", 1), ("done", 2)]
    assert plain[0]["data"] == {"stream": "stdout", "data": "one\n"}
    assert "out" not in plain[1]["data"] and plain[1]["data"]["status"] == "ok"
    assert len({r["id"] for r in plain}) == 1  # one stored event: resuming after it skips all of it
    folded = [r for r in _lines(fleet5, run.id, folded=1) if r.get("kind") != "end"]
    assert [(r["kind"], r["seq"]) for r in folded] == [("done", 2)]
    assert folded[0]["data"]["out"] == [["stdout", "one\n"]]


def test_a_long_task_still_streams_while_it_runs(fleet5: Fleet) -> None:
    run = fleet5.client.run("echo first; sleep 1; echo second", targets="db-1", timeout=30)
    kinds = [(e.kind, e.data) for e in run.events()]
    assert kinds[0][0] == "start"
    # the first line arrived on its own, before the done that carries the second
    assert kinds.index(("stdout", "first\n")) < kinds.index(("stdout", "second\n")) < len(kinds) - 1
    assert kinds[-1][0] == "done"
    db = sqlite3.connect(fleet5.root / "master" / "master.db")
    stored = [k for (k,) in db.execute("SELECT kind FROM events WHERE run_id=? ORDER BY id", (run.id,))]
    assert stored[0] == "start" and stored[-1] == "done" and "out" in stored


async def _finished(fold: bool) -> list[Any]:
    """The messages an executor spools for one echo task: for a master that reads folded dones
    (``fold``), or for an older one."""
    import anyio

    from agent.executor import Executor
    from hcsdk.protocol.messages import Task

    spooled: list[Any] = []
    executor = Executor("u1", spooled.extend, lambda taskid, cmd: True, lambda taskid, msgs: spooled.extend(msgs))
    executor.fold = lambda: fold
    task = Task(uuid="u1", cmd="echo", taskid="r1.0", args={"text": "hi"}, timeout=5, exp=time.time() + 60, aud="u1")
    async with anyio.create_task_group() as tg:
        executor.submit(task, tg)
    return spooled


@pytest.mark.anyio
async def test_an_older_master_gets_start_out_and_done_in_one_commit() -> None:
    folded = await _finished(True)
    assert [(m.T, m.seq) for m in folded] == [("done", 2)] and folded[0].out == [["stdout", "hi\n"]]
    plain = await _finished(False)
    assert [(m.T, m.seq) for m in plain] == [("start", 0), ("out", 1), ("done", 2)] and plain[2].out == []
