"""The bundled example plugins (file, log, java, tomcat), called in-process the way the worker
calls them: arguments validated against the command's schema, a real Context, real files, real
processes and a real HTTP server."""

from __future__ import annotations

import base64
import getpass
import hashlib
import importlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.plugins import BUNDLED
from agent.plugins import file as file_plugin
from agent.plugins import java as java_plugin
from agent.plugins import log as log_plugin
from agent.plugins import tomcat as tomcat_plugin
from agent.plugins.api import ArgError, CommandSpec, Context, PluginError, validate

MiB = 1024 * 1024


class Run:
    """One call of a plugin command, with everything it sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def send(self, stream: str, data: str) -> None:
        with self.lock:
            self.sent.append((stream, data))

    def text(self, stream: str = "stdout") -> str:
        with self.lock:
            return "".join(data for kind, data in self.sent if kind == stream)


def spec_of(func: Callable[..., Any]) -> CommandSpec:
    spec = func.__zy_command__  # type: ignore[attr-defined]
    assert isinstance(spec, CommandSpec)
    return spec


def call(func: Callable[..., Any], run: Run | None = None, **args: Any) -> Run:
    """Validate ``args`` against ``func``'s schema and call it as the worker does; a
    PluginError is kept in ``run.error``."""
    run = run or Run()
    checked = validate(spec_of(func).args, args)
    ctx = Context("task-1", "agent-uuid", run.send, run.cancelled)
    try:
        run.result = func(ctx, **checked)
    except PluginError as exc:
        run.error = exc
    return run


def fails(func: Callable[..., Any], **args: Any) -> str:
    run = call(func, **args)
    assert run.error is not None, f"expected an error, got result {run.result!r}"
    return str(run.error)


def in_thread(func: Callable[..., Any], **args: Any) -> tuple[Run, threading.Thread]:
    run = Run()
    thread = threading.Thread(target=call, args=(func, run), kwargs=args, daemon=True)
    thread.start()
    return run, thread


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- BUNDLED ----------------------------------------------------------------------------------

def test_bundled_map_matches_the_modules() -> None:
    """The agent routes cmd words by BUNDLED without importing plugins: it must say exactly
    what each module declares (found as the worker finds them: module attributes)."""
    for module_name, cmds in BUNDLED.items():
        module = importlib.import_module(f"agent.plugins.{module_name}")
        declared = sorted(spec.cmd for value in vars(module).values()
                          if isinstance(spec := getattr(value, "__zy_command__", None), CommandSpec))
        assert declared == sorted(cmds), module_name
        assert isinstance(module.VERSION, str) and module.__doc__


# -- file.read / file.write -------------------------------------------------------------------

@pytest.fixture
def roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """ZY_FILE_ROOTS limited to tmp_path/allowed."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("ZY_FILE_ROOTS", str(allowed))
    return allowed


def test_read_streams_the_file_and_reports_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    content = "héllo wörld\n" * 20000  # ~260 KiB: several pieces, multi-byte characters cut across them
    path.write_text(content)
    run = call(file_plugin.read, path=str(path), max_bytes=16 * MiB)
    raw = content.encode()
    assert run.error is None and run.text() == content
    assert all(len(data) <= 64 * 1024 for _, data in run.sent)
    assert len(run.sent) > 1
    assert run.result == {"path": str(path), "size": len(raw), "read": len(raw), "truncated": False,
                          "sha256": hashlib.sha256(raw).hexdigest()}


def test_read_base64_offset_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    raw = os.urandom(200_000)
    path.write_bytes(raw)
    run = call(file_plugin.read, path=str(path), encoding="base64", offset=1000, max_bytes=150_000)
    assert base64.b64decode(run.text()) == raw[1000:151_000]
    assert all(len(data) <= 64 * 1024 for _, data in run.sent)
    assert run.result["read"] == 150_000 and run.result["truncated"] is True
    assert run.result["sha256"] == hashlib.sha256(raw[1000:151_000]).hexdigest()
    assert "offset=151000" in run.text("stderr")
    past = call(file_plugin.read, path=str(path), offset=300_000)
    assert past.result["read"] == 0 and past.text() == ""


def test_read_binary_as_text_says_so(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"ok \xff\xfe end")
    run = call(file_plugin.read, path=str(path))
    assert run.text() == "ok \ufffd\ufffd end"
    assert "base64" in run.text("stderr")


def test_read_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    assert fails(file_plugin.read, path=str(missing)) == f"cannot read {str(missing)!r}: no such file or directory"
    assert "is a directory" in fails(file_plugin.read, path=str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "is a FIFO" in fails(file_plugin.read, path=str(fifo))  # refused, not a hang
    with pytest.raises(ArgError, match="at most"):
        call(file_plugin.read, path=str(missing), max_bytes=17 * MiB)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_read_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("x")
    path.chmod(0)
    assert "permission denied" in fails(file_plugin.read, path=str(path))


def test_path_rules(tmp_path: Path, roots: Path) -> None:
    inside = roots / "a.txt"
    inside.write_text("inside\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    (roots / "escape").symlink_to(outside)
    (roots / "proc").symlink_to("/proc/self")

    assert call(file_plugin.read, path=str(inside)).text() == "inside\n"
    assert fails(file_plugin.read, path="relative/a.txt") == "path 'relative/a.txt' is not allowed: it must be absolute"
    dotted = f"{roots}/../allowed/a.txt"
    assert fails(file_plugin.read, path=dotted) == f"path {dotted!r} is not allowed: '..' components are refused"
    assert "NUL byte" in fails(file_plugin.read, path=f"{inside}\0.txt")
    escape = fails(file_plugin.read, path=str(roots / "escape"))
    assert f"(resolves to {str(outside)!r})" in escape and "outside ZY_FILE_ROOTS" in escape
    assert "outside ZY_FILE_ROOTS" in fails(file_plugin.read, path=str(outside))
    assert "under /proc" in fails(file_plugin.read, path=str(roots / "proc" / "environ"))
    # a write through the symlink is refused as well, and leaves the target alone
    assert "outside ZY_FILE_ROOTS" in fails(file_plugin.write, path=str(roots / "escape"), content="x")
    assert outside.read_text() == "secret\n"


def test_system_directories_are_refused_even_with_all_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZY_FILE_ROOTS", raising=False)
    assert "under /proc" in fails(file_plugin.read, path="/proc/self/environ")
    assert "under /dev" in fails(file_plugin.write, path="/dev/null", content="x")
    assert "under /sys" in fails(file_plugin.read, path="/sys/kernel/hostname")


def test_several_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (two / "f").write_text("two\n")
    monkeypatch.setenv("ZY_FILE_ROOTS", f"{one}{os.pathsep}{two}")
    assert call(file_plugin.read, path=str(two / "f")).text() == "two\n"
    # a sibling whose name merely starts with a root's name is not under it
    (tmp_path / "one-more").mkdir()
    assert "outside" in fails(file_plugin.write, path=str(tmp_path / "one-more" / "f"), content="x")


def test_write_replaces_atomically_and_keeps_the_mode(roots: Path) -> None:
    path = roots / "config.ini"
    path.write_text("old\n")
    path.chmod(0o600)
    run = call(file_plugin.write, path=str(path), content="new\n", mode=0o644)
    assert run.error is None and path.read_text() == "new\n"
    assert (path.stat().st_mode & 0o7777) == 0o600  # replacing keeps the file's mode
    assert run.result == {"path": str(path), "size": 4, "written": 4, "sha256": hashlib.sha256(b"new\n").hexdigest()}
    assert sorted(p.name for p in roots.iterdir()) == ["config.ini"]


def test_write_through_a_symlink_inside_the_roots_updates_its_target(roots: Path) -> None:
    target = roots / "releases" / "v2.conf"
    target.parent.mkdir()
    target.write_text("v2\n")
    link = roots / "current.conf"
    link.symlink_to(target)
    assert call(file_plugin.write, path=str(link), content="v2 patched\n").error is None
    assert link.is_symlink() and target.read_text() == "v2 patched\n"


def test_write_new_file_mode_base64_append_and_dirs(roots: Path) -> None:
    path = roots / "sub" / "dir" / "data.bin"
    assert "make_dirs=true" in fails(file_plugin.write, path=str(path), content="x")
    raw = bytes(range(256))
    run = call(file_plugin.write, path=str(path), content=base64.b64encode(raw).decode(), encoding="base64",
               mode=0o640, make_dirs=True)
    assert run.error is None and path.read_bytes() == raw
    assert (path.stat().st_mode & 0o7777) == 0o640  # exactly, whatever the umask
    run = call(file_plugin.write, path=str(path), content="tail", append=True)
    assert path.read_bytes() == raw + b"tail"
    assert run.result["size"] == 260 and run.result["written"] == 4
    log = roots / "new.log"
    call(file_plugin.write, path=str(log), content="a\n", append=True, mode=0o600)
    assert log.read_text() == "a\n" and (log.stat().st_mode & 0o7777) == 0o600


def test_write_refusals(roots: Path) -> None:
    path = roots / "f.txt"
    assert "max_bytes=10 bytes" in fails(file_plugin.write, path=str(path), content="x" * 11, max_bytes=10)
    assert "not valid base64" in fails(file_plugin.write, path=str(path), content="***", encoding="base64")
    assert "lone surrogate" in fails(file_plugin.write, path=str(path), content="\ud800")
    assert "is a directory" in fails(file_plugin.write, path=str(roots), content="x")
    assert not path.exists()


def test_failed_write_leaves_the_old_file_and_no_temporary(roots: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = roots / "important.txt"
    path.write_text("old and intact\n")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    message = fails(file_plugin.write, path=str(path), content="new content\n")
    assert message == f"cannot write {str(path)!r}: No space left on device"
    assert path.read_text() == "old and intact\n"
    assert sorted(p.name for p in roots.iterdir()) == ["important.txt"]


# -- log.tail ---------------------------------------------------------------------------------

def test_tail_last_lines_without_following(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("".join(f"line {i}\n" for i in range(50_000)) + "unfinished")  # ~540 KiB: many blocks
    run = call(log_plugin.tail, path=str(path), lines=30_000, follow=False)
    expected = [f"line {i}" for i in range(20_001, 50_000)] + ["unfinished"]
    assert run.text().splitlines() == expected
    assert len(run.sent) > 1 and all(len(data) <= 64 * 1024 for _, data in run.sent)
    assert run.result == {"path": str(path), "lines": 30_000, "rotations": 0}
    assert call(log_plugin.tail, path=str(path), lines=0, follow=False).text() == ""
    assert call(log_plugin.tail, path=str(path), lines=2, follow=False).text() == "line 49999\nunfinished\n"


def test_tail_pattern_and_regex(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("".join(f"{'ERROR' if i % 7 == 0 else 'INFO'} event {i}\n" for i in range(1000)))
    run = call(log_plugin.tail, path=str(path), lines=2, follow=False, pattern="ERROR")
    assert run.text() == "ERROR event 987\nERROR event 994\n"
    run = call(log_plugin.tail, path=str(path), lines=3, follow=False, pattern=r"event 99\d$", regex=True)
    assert run.text() == "INFO event 997\nINFO event 998\nINFO event 999\n"
    assert "not a valid regular expression" in fails(log_plugin.tail, path=str(path), pattern="(", regex=True)
    assert "no such file" in fails(log_plugin.tail, path=str(tmp_path / "missing.log"))
    assert "is a directory" in fails(log_plugin.tail, path=str(tmp_path))


def test_tail_follows_across_rotation_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("".join(f"old {i}\n" for i in range(50)))
    run, thread = in_thread(log_plugin.tail, path=str(path), lines=3, pattern="")
    wait_for(lambda: "old 49\n" in run.text(), "the last lines")
    assert run.text() == "old 47\nold 48\nold 49\n"

    def writer() -> None:
        """Writes while the tail follows; rotates by rename, then creates the new file."""
        with open(path, "a") as out:
            for i in range(300):
                out.write(f"first {i}\n")
                out.flush()
            out.write("half a li")
            out.flush()
            os.rename(path, tmp_path / "app.log.1")
            out.write("ne\nlate\n")  # still written to the old file: the tail must finish it
            out.flush()
        with open(path, "w") as out:
            for i in range(300):
                out.write(f"second {i}\n")
                out.flush()

    writing = threading.Thread(target=writer)
    writing.start()
    writing.join()
    wait_for(lambda: "second 299\n" in run.text(), "the lines of the new file")
    with open(path, "w") as out:  # truncation in place (copytruncate): same inode, shorter
        out.write("after truncation\n")
    wait_for(lambda: "after truncation\n" in run.text(), "the line after truncation")
    run.cancelled.set()
    thread.join(10)
    assert not thread.is_alive() and run.error is None
    expected = (["old 47", "old 48", "old 49"] + [f"first {i}" for i in range(300)] + ["half a line", "late"]
                + [f"second {i}" for i in range(300)] + ["after truncation"])
    assert run.text().splitlines() == expected
    assert run.result == {"path": str(path), "lines": len(expected), "rotations": 2}
    assert "was replaced" in run.text("stderr") and "was truncated" in run.text("stderr")
    assert len(run.sent) < len(expected)  # lines go out in batches


def test_tail_for_seconds_ends_by_itself_and_sends_the_unfinished_line(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("a\nb\nc\nbb\nb without newline")
    run, thread = in_thread(log_plugin.tail, path=str(path), lines=5, for_seconds=0.3, pattern="b")
    thread.join(10)
    assert not thread.is_alive()
    # following holds the unfinished line back until it ends; then it goes out as it is
    assert run.text() == "b\nbb\nb without newline\n"
    assert run.result == {"path": str(path), "lines": 3, "rotations": 0}


def test_tail_refuses_a_rotated_in_symlink_outside_the_roots(tmp_path: Path, roots: Path) -> None:
    path = roots / "app.log"
    path.write_text("one\n")
    secret = tmp_path / "secret"
    secret.write_text("password\n")
    run, thread = in_thread(log_plugin.tail, path=str(path), lines=1)
    wait_for(lambda: run.text() == "one\n", "the first line")
    path.unlink()
    path.symlink_to(secret)
    thread.join(10)
    assert not thread.is_alive()
    assert "outside ZY_FILE_ROOTS" in str(run.error) and "password" not in run.text()


# -- java.gc ----------------------------------------------------------------------------------

FAKE_JSTAT = r"""#!/bin/sh
# jstat -gcutil PID [INTERVAL COUNT], as JDK $FAKE_JDK prints it
echo "$@" >> "$FAKE_JSTAT_LOG"
echo "$$" > "$FAKE_JSTAT_LOG.pid"
if [ -n "$FAKE_JSTAT_FAIL" ]; then
    echo "sun.jvmstat.monitor.MonitorException: $2 not found" >&2
    echo "	at jdk.internal.jvmstat/sun.jvmstat.perfdata.monitor.protocol.local.PerfDataBuffer.<init>" >&2
    exit 1
fi
count=${4:-1}
if [ "$FAKE_JDK" = 8 ]; then
    echo "  S0     S1     E      O      M     CCS    YGC     YGCT    FGC    FGCT     GCT   "
else
    echo "  S0     S1     E      O      M     CCS    YGC     YGCT     FGC    FGCT     CGC    CGCT       GCT   "
fi
i=0
while [ $i -lt $count ]; do
    if [ "$FAKE_JDK" = 8 ]; then
        echo "  0.00  99.84  $((30 + i)).01  31.52  97.51  95.26     $((12 + i))    0.068     2    0.093    0.161"
    else
        heap="  0.00 100.00  $((40 + i)).00  12.50      -      -"
        echo "$heap     $((5 + i))     0.041     0     0.000     2     0.003     0.044"
    fi
    i=$((i + 1))
    if [ -n "$FAKE_JSTAT_SLOW" ]; then sleep 0.05; fi
done
"""


@pytest.fixture
def fake_jstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A jstat on PATH (and no JAVA_HOME) that prints what a JDK's does; returns its log of calls."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    script = bindir / "jstat"
    script.write_text(FAKE_JSTAT)
    script.chmod(0o755)
    log = tmp_path / "jstat.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("FAKE_JSTAT_LOG", str(log))
    monkeypatch.setenv("FAKE_JDK", "17")
    return log


@pytest.fixture
def fake_jvms() -> Iterator[Callable[[str], int]]:
    """Starts processes that look like JVMs in /proc (argv[0] a java, a main class in argv)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(main_class: str) -> int:
        proc = subprocess.Popen(["/opt/fake-jdk/bin/java", "-c", "import time; time.sleep(60)", "-Xmx64m",
                                 main_class, "--port", "8080"], executable=sys.executable)
        started.append(proc)
        wait_for(lambda: b"-Xmx64m" in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), "the fake JVM")
        return proc.pid

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def unique_class() -> str:
    """A main class no other process on this host runs."""
    return f"com.example.shop.Shop{os.getpid()}x{time.monotonic_ns()}"


def test_gc_by_main_class_jdk17(fake_jstat: Path, fake_jvms: Callable[[str], int]) -> None:
    main = unique_class()
    pid = fake_jvms(main)
    fake_jvms(unique_class())  # another JVM, which must not match
    run = call(java_plugin.gc, main_class=main, samples=3, interval=0.25)
    assert run.error is None, run.error
    assert run.result == {"pid": pid, "S0": 0.0, "S1": 100.0, "E": 42.0, "O": 12.5, "M": None, "CCS": None,
                          "YGC": 7.0, "YGCT": 0.041, "FGC": 0.0, "FGCT": 0.0, "CGC": 2.0, "CGCT": 0.003, "GCT": 0.044}
    lines = run.text().splitlines()
    assert lines[0].split() == ["S0", "S1", "E", "O", "M", "CCS", "YGC", "YGCT", "FGC", "FGCT", "CGC", "CGCT", "GCT"]
    assert [line.split()[2] for line in lines[1:]] == ["40.00", "41.00", "42.00"]
    assert fake_jstat.read_text().split() == ["-gcutil", str(pid), "250", "3"]
    # the simple class name finds it too, and a pid needs no search
    assert call(java_plugin.gc, main_class=main.rsplit(".", 1)[1]).result["pid"] == pid
    assert call(java_plugin.gc, pid=pid).result["E"] == 40.0


def test_gc_jdk8_columns(fake_jstat: Path, fake_jvms: Callable[[str], int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_JDK", "8")
    pid = fake_jvms(unique_class())
    run = call(java_plugin.gc, pid=pid)
    assert run.result == {"pid": pid, "S0": 0.0, "S1": 99.84, "E": 30.01, "O": 31.52, "M": 97.51, "CCS": 95.26,
                          "YGC": 12.0, "YGCT": 0.068, "FGC": 2.0, "FGCT": 0.093, "GCT": 0.161}
    assert fake_jstat.read_text().split() == ["-gcutil", str(pid)]


def test_gc_stops_jstat_on_cancel(fake_jstat: Path, fake_jvms: Callable[[str], int],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_JSTAT_SLOW", "1")
    pid = fake_jvms(unique_class())
    run, thread = in_thread(java_plugin.gc, pid=pid, samples=100000, interval=0.05)
    wait_for(lambda: len(run.text().splitlines()) >= 3, "two samples")
    run.cancelled.set()
    thread.join(10)
    assert not thread.is_alive() and run.error is None
    assert run.result["pid"] == pid and run.result["E"] >= 41.0  # the last sample before the cancel
    jstat = int(Path(f"{fake_jstat}.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(jstat, 0)


def test_gc_errors(fake_jstat: Path, fake_jvms: Callable[[str], int], monkeypatch: pytest.MonkeyPatch) -> None:
    main = unique_class()
    first, second = fake_jvms(main), fake_jvms(main)
    several = fails(java_plugin.gc, main_class=main)
    assert several.startswith(f"2 JVMs match main_class {main!r}: ")
    assert f"pid {first}: {main} --port 8080" in several and f"pid {second}: {main} --port 8080" in several
    assert fails(java_plugin.gc, main_class="org.nowhere.Nothing").startswith(
        "no running JVM matches main_class 'org.nowhere.Nothing'")
    assert fails(java_plugin.gc, pid=first, main_class=main) == "give pid or main_class, not both"
    dead = fake_jvms(unique_class())
    os.kill(dead, 9)
    os.waitpid(dead, 0)
    assert fails(java_plugin.gc, pid=dead) == f"no such process: pid {dead}"
    monkeypatch.setenv("FAKE_JSTAT_FAIL", "1")
    failed = fails(java_plugin.gc, pid=first)
    assert failed.startswith(f"jstat -gcutil {first} failed (exit 1): sun.jvmstat.monitor.MonitorException: "
                             f"{first} not found (is pid {first} a JVM")
    assert "PerfDataBuffer" not in failed  # no stack trace
    monkeypatch.setenv("PATH", str(fake_jstat.parent / "empty"))
    assert fails(java_plugin.gc, pid=first) == "jstat not found: install a JDK or set JAVA_HOME"


# a plain skip, also in CI: scripts/setup.sh installs no JDK (default-jdk-headless is a 115 MB
# download, 265 MB installed); the fake-jstat tests above cover the plugin's logic without one
@pytest.mark.skipif(not (shutil.which("java") and shutil.which("jstat")),
                    reason="needs a JDK: java and jstat on PATH (apt-get install default-jdk-headless)")
def test_gc_real_jvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real JVM and the JDK's own jstat, found beside its java (PATH and JAVA_HOME say nothing)."""
    source = tmp_path / "Idle.java"
    source.write_text("public class Idle { public static void main(String[] a) throws Exception "
                      "{ Thread.sleep(60000); } }")
    java = shutil.which("java")
    assert java is not None
    proc = subprocess.Popen([java, "-Xmx32m", str(source)], cwd=tmp_path)
    try:
        perfdata = Path(f"/tmp/hsperfdata_{getpass.getuser()}/{proc.pid}")
        wait_for(perfdata.exists, "the JVM's perfdata", timeout=30)
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.delenv("JAVA_HOME", raising=False)
        run = call(java_plugin.gc, main_class=str(source), samples=2, interval=0.1)  # unique to this test run
        assert run.error is None, run.error
        assert run.result["pid"] == proc.pid
        assert {"S0", "S1", "E", "O", "YGC", "GCT"} <= set(run.result)
        assert len(run.text().splitlines()) == 3
    finally:
        proc.kill()
        proc.wait()


# -- tomcat.status ----------------------------------------------------------------------------

#: what Tomcat 9's manager answers on /manager/status?XML=true (one line in reality)
STATUS_XML = (
    "<?xml version=\"1.0\" encoding=\"utf-8\"?><?xml-stylesheet type=\"text/xsl\" href=\"/manager/xform.xsl\" ?>\n"
    "<status><jvm><memory free='41816504' total='130023424' max='1037959168'/>"
    "<memorypool name='G1 Eden Space' type='Heap memory' usageInit='27262976' usageCommitted='81788928' "
    "usageMax='-1' usageUsed='49283072'/>"
    "<memorypool name='Metaspace' type='Non-heap memory' usageInit='0' usageCommitted='25165824' usageMax='-1' "
    "usageUsed='23542872'/></jvm>"
    "<connector name='\"ajp-nio-127.0.0.1-8009\"'><threadInfo  maxThreads=\"200\" currentThreadCount=\"0\" "
    "currentThreadsBusy=\"0\" /><requestInfo  maxTime=\"0\" processingTime=\"0\" requestCount=\"0\" "
    "errorCount=\"0\" bytesReceived=\"0\" bytesSent=\"0\" /><workers></workers></connector>"
    "<connector name='\"http-nio-8080\"'><threadInfo  maxThreads=\"200\" currentThreadCount=\"10\" "
    "currentThreadsBusy=\"1\" /><requestInfo  maxTime=\"1520\" processingTime=\"8431\" requestCount=\"1234\" "
    "errorCount=\"17\" bytesReceived=\"2048\" bytesSent=\"5634213\" /><workers><worker  stage=\"S\" "
    "requestProcessingTime=\"3\" requestBytesSent=\"0\" requestBytesReceived=\"0\" remoteAddr=\"127.0.0.1\" "
    "virtualHost=\"localhost\" method=\"GET\" currentUri=\"/manager/status\" currentQueryString=\"XML=true\" "
    "protocol=\"HTTP/1.1\" /></workers></connector></status>"
)


@pytest.fixture(scope="module")
def tomcat() -> Iterator[str]:
    """A local HTTP server playing Tomcat's manager: /manager/status (basic auth admin:s3cret),
    /open/status (no auth), /html (the HTML page), /other (XML of another kind)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Manager(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/manager/status":
                expected = "Basic " + base64.b64encode(b"admin:s3cret").decode()
                if self.headers.get("Authorization") != expected:
                    return self.answer(401, b"<html><body>401 Unauthorized</body></html>", "text/html",
                                       {"WWW-Authenticate": 'Basic realm="Tomcat Manager Application"'})
                return self.answer(200, STATUS_XML.encode(), "text/xml;charset=utf-8")
            if path == "/open/status":
                return self.answer(200, STATUS_XML.encode(), "text/xml;charset=utf-8")
            if path == "/html":
                return self.answer(200, b"<!DOCTYPE html><html><body><h1>Server Status</h1><p>", "text/html")
            if path == "/other":
                return self.answer(200, b"<?xml version='1.0'?><feed><entry/></feed>", "text/xml")
            return self.answer(404, b"not found", "text/plain")

        def answer(self, code: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Manager)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


EXPECTED_STATUS = {
    "jvm_free": 41816504, "jvm_total": 130023424, "jvm_max": 1037959168, "jvm_used": 130023424 - 41816504,
    "connectors": 2,
    "ajp_nio_127_0_0_1_8009.threads_max": 200, "ajp_nio_127_0_0_1_8009.threads_current": 0,
    "ajp_nio_127_0_0_1_8009.threads_busy": 0, "ajp_nio_127_0_0_1_8009.requests": 0,
    "ajp_nio_127_0_0_1_8009.errors": 0, "ajp_nio_127_0_0_1_8009.max_time_ms": 0,
    "ajp_nio_127_0_0_1_8009.processing_time_ms": 0, "ajp_nio_127_0_0_1_8009.bytes_received": 0,
    "ajp_nio_127_0_0_1_8009.bytes_sent": 0,
    "http_nio_8080.threads_max": 200, "http_nio_8080.threads_current": 10, "http_nio_8080.threads_busy": 1,
    "http_nio_8080.requests": 1234, "http_nio_8080.errors": 17, "http_nio_8080.max_time_ms": 1520,
    "http_nio_8080.processing_time_ms": 8431, "http_nio_8080.bytes_received": 2048,
    "http_nio_8080.bytes_sent": 5634213,
}


def test_tomcat_status_with_basic_auth(tomcat: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a loopback URL must not go through it
    run = call(tomcat_plugin.status, url=f"{tomcat}/manager/status?XML=true", user="admin", password="s3cret")
    assert run.error is None, run.error
    assert run.result == EXPECTED_STATUS
    assert run.text() == ("JVM memory: 84.1 MiB used of 124.0 MiB (max 989.9 MiB)\n"
                          "ajp-nio-127.0.0.1-8009: 0 of 0 threads busy (max 200); 0 requests, 0 errors, slowest 0 ms\n"
                          "http-nio-8080: 1 of 10 threads busy (max 200); 1234 requests, 17 errors, slowest 1520 ms\n")


def test_tomcat_status_without_auth(tomcat: str) -> None:
    assert call(tomcat_plugin.status, url=f"{tomcat}/open/status?XML=true").result == EXPECTED_STATUS


def test_tomcat_errors(tomcat: str) -> None:
    url = f"{tomcat}/manager/status?XML=true"
    assert fails(tomcat_plugin.status, url=url) == (
        f"{url} answered 401 Unauthorized: give user and password (a Tomcat user with the manager-status role)")
    assert fails(tomcat_plugin.status, url=url, user="admin", password="wrong") == (
        f"{url} answered 401 Unauthorized: the credentials of user 'admin' were refused")
    assert "is not XML" in fails(tomcat_plugin.status, url=f"{tomcat}/html")
    assert "not Tomcat's status (its root is <feed>)" in fails(tomcat_plugin.status, url=f"{tomcat}/other")
    assert "404 Not Found" in fails(tomcat_plugin.status, url=f"{tomcat}/nothing")
    assert "must start with http:// or https://" in fails(tomcat_plugin.status, url="file:///etc/passwd")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert fails(tomcat_plugin.status, url=f"http://127.0.0.1:{port}/manager/status?XML=true") == (
        f"cannot connect to http://127.0.0.1:{port}/manager/status?XML=true: connection refused "
        "(is Tomcat running there?)")
