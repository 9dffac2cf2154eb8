"""The readable view of a run's results (hcsdk._display): unit tests on DataFrames made by the
SDK's own run code from hand-written events (so they have exactly to_dataframe()'s shape), then
the view as a real kernel and the live widget show it, against a real fleet."""

from __future__ import annotations

import html
import os
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pandas as pd

import hcsdk
from fleet import Fleet
from hcsdk import COLUMNS, ResultView
from hcsdk._display import STATUS_COLORS, clean, readable, results_table
from hcsdk._run import AsyncRun

T0 = datetime(2026, 12, 7, 8, 26, 16, 230822, tzinfo=UTC).timestamp()
UUIDS = ["507bbfb8-a4ba-4fb9-92d3-20f2c4cf28bc", "20034f4f-1111-4fb9-92d3-20f2c4cf28bc",
         "2e2e2eb6-2222-4fb9-92d3-20f2c4cf28bc", "433393d8-3333-4fb9-92d3-20f2c4cf28bc"]
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def frame(*targets: dict[str, Any]) -> pd.DataFrame:
    """A DataFrame exactly as Run.to_dataframe() makes it: the run's own event handling and
    snapshot, fed the events a master would send. Each target: hostname, and optionally status
    (None: still running), stdout, stderr, exit_code, error, truncated, result, took."""
    info = {"run_id": "r1", "cmd": "shell",
            "targets": [{"taskid": f"r1.{i}", "uuid": t.get("uuid", UUIDS[i % 4]), "hostname": t["hostname"]}
                        for i, t in enumerate(targets)]}
    run = AsyncRun(None, info)  # type: ignore[arg-type]  # no client: only _apply and snapshot are used
    seq = 0
    for i, t in enumerate(targets):
        taskid = f"r1.{i}"
        run._apply({"taskid": taskid, "kind": "start", "seq": (seq := seq + 1), "data": {"started_at": T0}})
        for stream in ("stdout", "stderr"):
            if t.get(stream):
                run._apply({"taskid": taskid, "kind": "out", "seq": (seq := seq + 1),
                            "data": {"stream": stream, "data": t[stream]}})
        if t.get("status", "ok") is not None:
            run._apply({"taskid": taskid, "kind": "done", "seq": (seq := seq + 1), "data": {
                "status": t.get("status", "ok"), "exit_code": t.get("exit_code", 0), "started_at": T0,
                "finished_at": T0 + t.get("took", 0.25), "error": t.get("error"),
                "truncated": t.get("truncated"), "result": t.get("result")}})
    df = run.snapshot()
    assert list(df.columns) == COLUMNS
    return df


def text_of(markup: str) -> str:
    """What a reader sees of an HTML fragment, every fold open (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<style>.*?</style>|<[^>]+>", "", markup, flags=re.S))


def test_columns_read_hostname_first_with_a_short_uuid() -> None:
    df = frame({"hostname": "web-1", "stdout": "hi\n"})
    out = ResultView(df).to_html()
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", out)
    assert heads == ["hostname", "uuid", "status", "exit", "started", "took", "output"]
    assert ">507bbfb8<" in out and UUIDS[0] not in text_of(out)  # the full uuid only on hover
    assert f'title="{UUIDS[0]}"' in out
    text = repr(ResultView(df))
    assert text.splitlines()[1].split() == ["hostname", "uuid", "status", "exit", "started", "took", "output"]
    assert re.search(r"^web-1\s+507bbfb8\s+ok\s+0\s+\d\d:\d\d:\d\d\s+0\.25s\s+hi$", text, re.M), text
    assert UUIDS[0] not in text


def test_output_keeps_its_line_breaks_and_never_shows_a_literal_backslash_n() -> None:
    df = frame({"hostname": "web-1", "stdout": "6.1.0-13-amd64\n 10:01:02 up 3 days\n"})
    out = ResultView(df).to_html()
    assert "6.1.0-13-amd64\n 10:01:02 up 3 days</div>" in out and "white-space:pre-wrap" in out
    assert "\\n" not in out
    text = repr(ResultView(df))
    assert "\\n" not in text
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith("6.1.0-13-amd64"))
    assert lines[at + 1].strip() == "10:01:02 up 3 days"
    assert lines[at + 1].index("10:01") == lines[at].index("6.1.0") + 1  # under the output column


def test_long_output_is_folded_with_the_full_text_one_click_away() -> None:
    full = "".join(f"line number {i}\n" for i in range(1, 201))
    df = frame({"hostname": "web-1", "stdout": full})
    out = ResultView(df).to_html()
    assert out.count("<details") == 1
    summary = re.search(r"<summary[^>]*>(.*?)</summary>", out, re.S)
    assert summary is not None
    shown = text_of(summary.group(1))
    assert "line number 6\n" in shown and "line number 7\n" not in shown and "▸ 194 more lines" in shown
    # opened, the summary's lines and the folded rest are the whole output, in order, once
    body = re.search(r"</summary>(.*?)</details>", out, re.S)
    assert body is not None
    opened = text_of(summary.group(1)).split("▸")[0] + text_of(body.group(1))
    assert opened == full.rstrip("\n")
    # one very long line folds too (the fixed table wraps it, nothing scrolls sideways)
    out = ResultView(frame({"hostname": "web-1", "stdout": "x" * 5000})).to_html()
    assert "<details" in out and "table-layout:fixed;width:100%" in out and "overflow-wrap:anywhere" in out
    # the text table folds as well and stays within its width
    text = repr(ResultView(df))
    assert "line number 6" in text and "line number 7" not in text and "… 194 more lines" in text
    wide = repr(ResultView(frame({"hostname": "w", "stdout": "y" * 5000})))
    assert max(len(line) for line in wide.splitlines()) <= 100


def test_huge_output_is_capped_in_the_page_not_in_the_data() -> None:
    df = frame({"hostname": "web-1", "stdout": "z" * 200_000})
    out = ResultView(df).to_html()
    assert out.count("z") < 70_000 and "more not shown: the DataFrame has all of it" in out
    assert len(df.loc[0, "stdout"]) == 200_000


def test_hostile_output_is_escaped_everywhere() -> None:
    df = frame({"hostname": HOSTILE, "uuid": f'"><script>alert(2)</script>{UUIDS[0]}', "status": "error",
                "exit_code": None, "stdout": HOSTILE + "\n" * 10 + HOSTILE, "stderr": HOSTILE, "error": HOSTILE,
                "result": {"k": HOSTILE}})
    out = ResultView(df).to_html()
    for markup in (out, results_table(df, table_class="zyrun-table")):
        assert "<script" not in markup and "<img" not in markup
        assert 'title="&quot;&gt;&lt;script&gt;alert(2)' in markup  # the uuid's attribute stays one attribute
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in markup
        assert text_of(markup).count('<script>alert("x")</script>') >= 4  # shown to the reader as text


def test_terminal_escapes_and_control_characters_are_not_passed_on() -> None:
    assert clean("\x1b[31mred\x1b[0m ok") == "red ok"
    assert clean("10%\r50%\r100%\nnext\r\n") == "100%\nnext\n"
    assert clean("a\x00b\x07\x7f") == "a\u2400b\u2407\u2421"
    assert clean("tab\tkept") == "tab\tkept"
    df = frame({"hostname": "web-1", "stdout": "\x1b]0;title\x07\x1b[2Jwiped\n"})
    assert "\x1b" not in repr(ResultView(df)) and "\x1b" not in ResultView(df).to_html()
    assert "wiped" in repr(ResultView(df))


def test_times_are_short_and_local() -> None:
    df = frame({"hostname": "web-1", "stdout": "hi\n"})
    assert "+00:00" in str(df.loc[0, "started_at"])  # the data keeps UTC, to the nanosecond
    hk = timezone(timedelta(hours=8), "HKT")
    out = ResultView(df, tz=hk).to_html()
    assert ">16:26:16</span>" in out and "08:26:16" not in text_of(out).split("started", 2)[-1]
    assert "+00:00" not in out and ".230822" not in text_of(out)
    assert "started 2026-12-07 16:26:16 HKT" in out
    assert re.search(r"^web-1 .* 16:26:16 ", repr(ResultView(df, tz=hk)), re.M)
    local = datetime.fromtimestamp(T0).astimezone()  # without tz: this machine's own timezone
    assert f">{local:%H:%M:%S}</span>" in ResultView(df).to_html()


def test_status_colours() -> None:
    expected = {"ok": "green", "failed": "red", "error": "red", "timeout": "orange", "offline": "orange",
                "cancelled": "grey"}
    hue = {"#1b5e20": "green", "#b71c1c": "red", "#bf360c": "orange", "#424242": "grey"}
    df = frame(*({"hostname": f"h-{s}", "status": s, "exit_code": None} for s in expected))
    out = ResultView(df).to_html()
    for status, colour in expected.items():
        chip = re.search(rf'<span style="color:(#\w+);[^"]*">{status}</span>', out)
        assert chip is not None, status
        assert hue[chip.group(1)] == colour == hue[STATUS_COLORS[status]], status


def test_problems_first_and_row_limits() -> None:
    df = frame({"hostname": "web-2"}, {"hostname": "db-1", "status": "failed", "exit_code": 3, "stderr": "disk\n"},
               {"hostname": "web-1"}, {"hostname": "web-3", "status": "timeout", "exit_code": None})
    order = re.findall(r"font-weight:600\">([\w-]+)</td>", ResultView(df).to_html())
    assert order == ["db-1", "web-3", "web-1", "web-2"]
    order = re.findall(r"font-weight:600\">([\w-]+)</td>", ResultView(df, sort=False).to_html())
    assert order == ["web-2", "db-1", "web-1", "web-3"]
    out = ResultView(df, max_rows=2).to_html()
    assert "… and 2 more targets" in out and "web-2" not in out
    assert "… and 2 more targets" in repr(ResultView(df, max_rows=2))
    assert "4 targets" in out and "failed 1" in out and "timeout 1" in out and "ok 2" in out


def test_unfinished_targets_and_missing_values() -> None:
    df = frame({"hostname": "web-1", "status": None, "stdout": "half\n"}, {"hostname": "web-2"})
    assert df["status"].isna().sum() == 1 and df["exit_code"].isna().sum() == 1
    out = results_table(df, table_class="zyrun-table")
    assert ">running</span>" in out and "half" in out and "<NA>" not in out and "nan" not in out.lower()
    assert "<NA>" not in repr(ResultView(df)) and "NaT" not in repr(ResultView(df))
    assert ResultView(df.iloc[0:0]).to_html().count("<tr>") == 1  # no targets: the header alone
    # a selection of the columns still renders what it has
    assert "web-1" in ResultView(df[["hostname", "stdout"]]).to_html()


def test_readable_changes_how_it_shows_not_what_it_is() -> None:
    from IPython.core.formatters import DisplayFormatter

    df = frame({"hostname": "web-1", "stdout": "a\nb\n"})
    before = df.copy()
    same = readable(df)
    assert same is df and type(df) is pd.DataFrame and df.equals(before) and list(df.columns) == COLUMNS
    data, _ = DisplayFormatter().format(df)
    assert "zy-result-view" in data["text/html"] and ">507bbfb8<" in data["text/html"]
    assert data["text/plain"].splitlines()[1].startswith("hostname")
    # copies and selections are ordinary DataFrames again
    assert "zy-result-view" not in DisplayFormatter().format(df[["hostname", "stdout"]])[0]["text/html"]
    assert "zy-result-view" not in DisplayFormatter().format(df.copy())[0]["text/html"]
    assert not hasattr(pd.read_pickle(_pickled(df)), "_repr_mimebundle_")


def _pickled(df: pd.DataFrame) -> Any:
    import io

    buf = io.BytesIO()
    df.to_pickle(buf)
    buf.seek(0)
    return buf


def test_view_takes_a_frame_or_a_run() -> None:
    df = frame({"hostname": "web-1"})
    assert hcsdk.view(df).df is df

    class HasSnapshot:
        def snapshot(self) -> pd.DataFrame:
            return df

    assert hcsdk.view(HasSnapshot()).df is df


# -- against a real fleet -------------------------------------------------------------------------


def test_widget_table_is_the_readable_one_and_escaped(fleet4: Fleet) -> None:
    from kernel_ext.views import WidgetView

    run = fleet4.client.run("printf '<script>alert(1)</script>\\nsecond line\\n'", targets="web-*", timeout=30)
    view = WidgetView(run, max_rows=10)
    run.wait(30)
    view.render(final=True)
    table = view.table.value
    assert "<script" not in table and "&lt;script&gt;alert(1)&lt;/script&gt;\nsecond line" in table
    for uuid in run.snapshot()["uuid"]:
        assert f">{uuid[:8]}<" in table
    assert table.count("<tr>") == 4  # a header and 3 targets (tests/test_browser.py counts them)
    shown = run.view().to_html()  # the sync Run's own view: the same rows
    assert all(f">{uuid[:8]}<" in shown for uuid in run.snapshot()["uuid"]) and "<script" not in shown


def test_zyrun_in_a_kernel_shows_the_readable_view_and_binds_the_dataframe(fleet4: Fleet) -> None:
    from test_kernel import Kernel

    kernel = Kernel({**os.environ, "ZY_CONFIG": str(fleet4.config_path)})
    try:
        reply, _ = kernel.execute("%load_ext kernel_ext\n%zyconnect")
        assert reply["status"] == "ok", reply
        reply, msgs = kernel.execute("%%zyrun -t web-* -o res --timeout 30\necho first; echo '<b>second</b>'")
        assert reply["status"] == "ok", reply
        results = [m["content"]["data"] for m in msgs if m["msg_type"] == "execute_result"]
        assert len(results) == 1
        shown, plain = results[0]["text/html"], results[0]["text/plain"]
        uuids = fleet4.client.inventory("web-*")["uuid"]
        for uuid in uuids:
            assert f">{uuid[:8]}<" in shown and uuid[:8] in plain
        assert "\\n" not in shown and "\\n" not in plain
        assert "first\n&lt;b&gt;second&lt;/b&gt;" in shown and "<b>second" not in shown
        assert plain.splitlines()[1].split()[:2] == ["hostname", "uuid"]
        # what is bound is the DataFrame, as to_dataframe() makes it
        reply, msgs = kernel.execute("import hcsdk; print(type(res).__name__, list(res.columns) == hcsdk.COLUMNS,"
                                     " res is _zy, sorted(set(res['stdout'])))")
        text = "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")
        assert text.strip() == "DataFrame True True ['first\\n<b>second</b>\\n']", text
        # --bg: what the handle's wait() returns shows the same way
        reply, _ = kernel.execute("%%zyrun -t db-1 --bg -o job\necho later")
        assert reply["status"] == "ok", reply
        reply, msgs = kernel.execute("job.wait(30)")
        results = [m["content"]["data"] for m in msgs if m["msg_type"] == "execute_result"]
        assert results and "zy-result-view" in results[0]["text/html"] and "later" in results[0]["text/html"]
    finally:
        kernel.close()
