"""The magics in an in-process IPython shell (no kernel, so the text view stands in)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError

from fleet import Fleet, wait_for


@pytest.fixture(scope="module")
def ip(fleet4: Fleet) -> Iterator[Any]:
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "kernel_ext")
    ca = fleet4.root / "master" / "ca.pem"
    shell.run_line_magic("zyconnect", f"{fleet4.url} --token {fleet4.admin_token} --ca {ca}")
    yield shell
    magics = shell.magics_manager.registry["ZyRun"]
    if magics._client is not None:
        magics._client.close()
        magics._client = None


def run(ip: Any, cell: str) -> Any:
    """Run a cell; raise what it raised (UsageError included) instead of printing it."""
    result = ip.run_cell(cell)
    if result.error_before_exec or result.error_in_exec:
        raise result.error_before_exec or result.error_in_exec
    return result.result


def test_cell_magic_returns_and_binds_the_dataframe(ip: Any) -> None:
    df = run(ip, "%%zyrun -t web-* -o web_res\necho hello from $ZY_HOSTNAME")
    assert isinstance(df, pd.DataFrame) and len(df) == 3
    assert sorted(df["stdout"]) == [f"hello from web-{i}\n" for i in (1, 2, 3)]
    assert ip.user_ns["web_res"] is df and ip.user_ns["_zy"] is df


@pytest.mark.parametrize(
    ("setup", "flag", "expected"),
    [
        ("t = 'label:role=web,idc=hk'", "t", {"web-1", "web-2"}),
        ("t = ['web-3', 'db-1']", "t", {"web-3", "db-1"}),
        ("t = %zyinventory label:idc=sg", "t", {"web-3"}),
        ("inv_all = %zyinventory\nt = inv_all['uuid'].tolist()[:1]", "t", None),
        ("", "web-1,db-1", {"web-1", "db-1"}),
        ("", "label:role=db", {"db-1"}),
    ],
)
def test_target_forms(ip: Any, setup: str, flag: str, expected: set[str] | None) -> None:
    if setup:
        run(ip, setup)
    df = run(ip, f"%%zyrun -t {flag} --quiet\ntrue")
    assert df is None  # --quiet shows nothing...
    got = set(ip.user_ns["_zy"]["hostname"])  # ...but binds _zy
    if expected is None:
        assert len(got) == 1
    else:
        assert got == expected


def test_interpolation_and_escaping(ip: Any) -> None:
    ip.user_ns.update(word="spam", n=3)
    df = run(ip, "%%zyrun -t web-1\n"
                 "echo {word} {n * 2} {{literal}} ${HOME:+home-set} $ZY_HOSTNAME\n"
                 "x=1; echo ${x}")
    assert df.loc[0, "stdout"] == "spam 6 {literal} home-set web-1\n1\n"
    df = run(ip, "%zyrun -t web-{n} -- echo '{word}' \"$ZY_HOSTNAME; ok\"")
    assert df.loc[0, "stdout"] == "spam web-3; ok\n"
    df = run(ip, "%zyrun -t web-1 echo $ZY_HOSTNAME | tr a-z A-Z")  # verbatim without -- too
    assert df.loc[0, "stdout"] == "WEB-1\n"
    ip.user_ns["sel"] = "label:role=web, idc=hk"  # a value with a space stays one option
    df = run(ip, "%zyrun -t {sel} --quiet -- true")
    assert df is None and set(ip.user_ns["_zy"]["hostname"]) == {"web-1", "web-2"}
    with pytest.raises(UsageError, match="cannot expand {nothing_here}"):
        run(ip, "%%zyrun -t web-1\necho {nothing_here}")


def test_bg_returns_at_once_and_fills_in(ip: Any, tmp_path: Path) -> None:
    gate = tmp_path / "go"
    handle = run(ip, f"%%zyrun -t web-* --bg -o job\n"
                     f"[ $ZY_HOSTNAME = web-1 ] || while [ ! -e {gate} ]; do sleep 0.1; done; echo late")
    assert not handle.done
    assert ip.user_ns["job"] is handle and ip.user_ns["_zy"] is handle
    run(ip, "x = 1 + 1")  # the user works in other cells meanwhile
    # web-1 is done while the others wait for the gate: the handle's DataFrame is half full
    wait_for(lambda: (handle.df["status"] == "ok").sum() == 1, 30, "web-1's row to fill in")
    assert handle.df["status"].isna().sum() == 2 and not handle.done
    gate.touch()
    df = handle.wait(30)
    assert handle.done and (df["status"] == "ok").all() and (df["stdout"] == "late\n").all()
    assert "done" in repr(handle)


def test_bg_handle_cancels(ip: Any) -> None:
    handle = run(ip, "%%zyrun -t db-1 --bg\nsleep 300")
    wait_for(lambda: handle.run.snapshot()["started_at"].notna().all(), 30, "the command to start")
    assert handle.cancel() == 1
    assert list(handle.wait(30)["status"]) == ["cancelled"]


def test_text_progress_line_stands_in_without_widgets(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "%%zyrun -t db-1\necho text")
    out = capsys.readouterr().out
    assert "zyrun r" in out and "1/1 done (ok 1)" in out


def test_show_output_groups_identical_output(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, '%%zyrun -t * --quiet --show-output\n[ "$ZY_HOSTNAME" = db-1 ] && echo different || echo same')
    out = capsys.readouterr().out
    assert "── 3 targets (ok): web-1, web-2, web-3\nsame" in out
    assert "── 1 target (ok): db-1\ndifferent" in out


def test_config_sets_defaults(ip: Any) -> None:
    run(ip, "%config ZyRun.timeout = 1.0")
    run(ip, "%config ZyRun.targets = 'db-1'")
    try:
        df = run(ip, "%%zyrun\nsleep 10")
        assert list(df["hostname"]) == ["db-1"] and df.loc[0, "status"] == "timeout"
    finally:
        run(ip, "%config ZyRun.timeout = 600.0")
        run(ip, "%config ZyRun.targets = ''")


def test_errors_are_one_line_usage_errors(ip: Any, fleet4: Fleet) -> None:
    with pytest.raises(UsageError, match="unknown target 'web-9'"):
        run(ip, "%%zyrun -t web-9\ntrue")
    with pytest.raises(UsageError, match="no targets"):
        run(ip, "%%zyrun\ntrue")
    with pytest.raises(UsageError, match="nothing to run"):
        run(ip, "%%zyrun -t web-1\n   ")
    with pytest.raises(UsageError, match="unrecognized arguments: --frobnicate"):
        run(ip, "%%zyrun -t web-1 --frobnicate\ntrue")
    with pytest.raises(UsageError, match="unexpected words on the %%zyrun line: .stray words."):
        run(ip, "%%zyrun -t web-1 stray words\ntrue")
    with pytest.raises(UsageError, match="-o wants a variable name, got 'class'"):
        run(ip, "%%zyrun -t web-1 -o class\ntouch /tmp/zy-should-not-run")
    with pytest.raises(UsageError, match="cannot split the exec command"):
        run(ip, "%zyrun -t web-1 --cmd exec -- echo 'unbalanced")
    with pytest.raises(UsageError, match="refused the request \\(401\\)"):
        run(ip, f"%zyconnect {fleet4.url} --token nope --ca {fleet4.root / 'master' / 'ca.pem'}")
    with pytest.raises(UsageError, match="cannot reach the master"):
        run(ip, f"%zyconnect https://127.0.0.1:1 --token x --ca {fleet4.root / 'master' / 'ca.pem'}")
    # the failed connects left the working connection in place
    assert run(ip, "%zyrun -t web-1 --quiet -- true") is None


def test_plugin_commands_take_arguments(ip: Any, tmp_path: Path) -> None:
    motd = tmp_path / "motd"
    motd.write_text("hello\n")
    df = run(ip, f"%zyrun -t web-1 --cmd file.read --arg path={motd} --arg max_bytes:=3")
    assert df.loc[0, "status"] == "ok" and df.loc[0, "stdout"] == "hel" and df.loc[0, "result"]["truncated"]
    df = run(ip, "%zyrun -t web-1 --cmd echo --arg text:=42")
    assert df.loc[0, "status"] == "error" and df.loc[0, "error"] == "args.text must be a string (got 42)"
    assert run(ip, "%zyrun -t web-1 --cmd echo --arg text=42").loc[0, "stdout"] == "42\n"
    with pytest.raises(UsageError, match="--arg wants KEY=TEXT or KEY:=JSON, got 'path'"):
        run(ip, "%zyrun -t web-1 --cmd file.read --arg path")


def test_help(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "%zyrun --help")
    out = capsys.readouterr().out
    assert "--bg" in out and "{name}" in out and "_zy" in out


def test_widget_view_reflects_a_finished_run(fleet4: Fleet) -> None:
    from kernel_ext.views import WidgetView

    run_ = fleet4.client.run("echo w; [ $ZY_HOSTNAME != db-1 ]", targets="*", timeout=30)
    view = WidgetView(run_, max_rows=2)
    run_.wait(30)
    view.render(final=True)
    assert view.bar.value == view.bar.max == 4 and view.bar.bar_style == "warning"
    assert "ok 3" in view.label.value and "failed 1" in view.label.value
    assert view.table.value.index("db-1") < view.table.value.index("web-"), "failures first"
    assert "and 2 more" in view.table.value




def test_zyrelease_starts_a_release_and_shows_it(ip: Any, fleet4: Fleet, tmp_path: Path) -> None:
    package = tmp_path / "pkg.tgz"
    package.write_bytes(b"release me\n" * 1000)
    art = fleet4.client.artifacts.upload(package)
    dest = tmp_path / "out"
    dest.mkdir()
    rel = run(ip, f"%zyrelease {art['id']} -t web-* --dest {dest}/{{hostname}}.tgz --batch 2 "
                  f"--health 'test -s {dest}/$ZY_HOSTNAME.tgz' -o myrel")
    assert rel.state == "done" and ip.user_ns["myrel"] is rel and ip.user_ns["_zyrelease"] is rel
    assert all((dest / f"web-{i}.tgz").read_bytes() == package.read_bytes() for i in (1, 2, 3))
    shown = run(ip, "%zyrelease myrel")
    assert shown is rel
    with pytest.raises(UsageError, match="no release 'rel-nope'"):
        run(ip, "%zyrelease rel-nope")
    with pytest.raises(UsageError, match="--dest PATH is needed"):
        run(ip, f"%zyrelease {art['id']} -t web-1")


def test_release_widget_buttons_follow_the_state(fleet4: Fleet, tmp_path: Path) -> None:
    from kernel_ext.release_view import ReleaseWidget

    package = tmp_path / "w.tgz"
    package.write_bytes(b"w" * 5000)
    art = fleet4.client.artifacts.upload(package)
    dest = tmp_path / "wout"
    dest.mkdir()
    rel = fleet4.client.release(art["id"], ["web-1", "web-2"], dest=f"{dest}/{{hostname}}", batch=1,
                                health='[ "$ZY_HOSTNAME" != web-1 ]')
    widget = ReleaseWidget(rel, interval=0.2)
    widget.follow()
    rel.wait(60)
    wait_for(lambda: widget.buttons["Continue"].disabled is False, what="the widget to show the pause")
    assert rel.state == "paused" and widget.buttons["Pause"].disabled
    assert "web-1" in widget.table.value and "health: " in widget.table.value
    widget.buttons["Abort"].click()
    assert rel.state == "aborted" and widget.buttons["Abort"].disabled
    widget.buttons["Rollback"].click()
    rel.wait(60)
    assert rel.state == "rolled_back"
    widget.stop()
