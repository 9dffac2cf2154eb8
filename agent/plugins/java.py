"""``java.gc``: a JVM's garbage-collection figures, from ``jstat -gcutil``.

The JVM is given by ``pid``, or found by ``main_class`` among the running Java processes (those
whose ``argv[0]`` is ``java``, read from ``/proc/*/cmdline``; ``jps -l`` where there is no
``/proc``): a process matches when one of its arguments is ``main_class`` or ends with
``.main_class`` or ``/main_class`` (so ``Bootstrap`` finds Tomcat's
``org.apache.catalina.startup.Bootstrap``, ``app.jar`` finds ``-jar /opt/app.jar``). With
neither, the only JVM running is used.

``jstat`` is looked for next to the JVM's own ``java`` (its JDK), then in ``$JAVA_HOME/bin``,
then on ``PATH``. Its columns differ between JDK versions (``P`` before 8, ``CGC``/``CGCT``
from 9 on), so they are taken from its header: the result is the last sample, one float per
column by jstat's name (``None`` where jstat prints ``-``), plus ``pid``.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess

from agent.plugins.api import Arg, Context, PluginError, command

VERSION = "1.0"

#: java launcher options that take the next argument as their value
_VALUE_OPTIONS = {"-cp", "-classpath", "--class-path", "-p", "--module-path", "--upgrade-module-path",
                  "--add-modules", "--limit-modules", "--add-opens", "--add-exports", "--add-reads",
                  "--enable-native-access"}
_NO_JSTAT = "jstat not found: install a JDK or set JAVA_HOME"


# -- which JVM ---------------------------------------------------------------------------------

def main_of(argv: list[str]) -> str:
    """What a java command line runs: its main class, ``-jar`` file or ``-m`` module."""
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-jar", "-m", "--module"):
            return next(args, "")
        if arg in _VALUE_OPTIONS:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return ""


def java_processes() -> dict[int, list[str]]:
    """pid -> command line of the Java processes we can see."""
    if not os.path.isdir("/proc"):
        return _jps()
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # gone, or not ours to read
        argv = [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]
        if argv and os.path.basename(argv[0]) in ("java", "javaw"):
            found[int(entry)] = argv
    return found


def _jps() -> dict[int, list[str]]:
    jps = _tool("jps", None)
    if jps is None:
        return {}
    result = subprocess.run([jps, "-l"], capture_output=True, text=True, timeout=30)
    found: dict[int, list[str]] = {}
    for line in result.stdout.splitlines():
        pid, _, name = line.strip().partition(" ")
        if pid.isdigit() and not name.endswith("sun.tools.jps.Jps"):
            found[int(pid)] = ["java", name]
    return found


def _match(argv: list[str], main_class: str) -> int | None:
    """Where in ``argv`` the main class (or jar) ``main_class`` is, if it is there."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == main_class or arg.endswith(("." + main_class, "/" + main_class)):
            return i
    return None


def describe(argv: list[str], main_class: str = "") -> str:
    """The telling part of a java command line: from its main class on (program arguments tell
    two instances of one application apart), shortened."""
    start = _match(argv, main_class) if main_class else None
    if start is None:
        main = main_of(argv)
        start = argv.index(main) if main in argv[1:] else len(argv)
    text = " ".join(argv[start:]) or "?"
    return text if len(text) <= 100 else text[:97] + "..."


def choose_jvm(pid: int, main_class: str) -> int:
    """The pid to sample; PluginError when there is no such JVM, or several."""
    if pid and main_class:
        raise PluginError("give pid or main_class, not both")
    if pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise PluginError(f"no such process: pid {pid}") from None
        except PermissionError:
            pass  # it exists; jstat will say whether it may look at it
        return pid
    jvms = java_processes()
    found = {p: argv for p, argv in jvms.items() if not main_class or _match(argv, main_class) is not None}
    if not found and not main_class:
        raise PluginError("no running JVM found")
    if not found:
        running = "; ".join(f"pid {p}: {describe(argv)}" for p, argv in sorted(jvms.items()))
        raise PluginError(f"no running JVM matches main_class {main_class!r} (running: {running or 'none'})")
    if len(found) > 1:
        names = "; ".join(f"pid {p}: {describe(argv, main_class)}" for p, argv in sorted(found.items()))
        which = f"match main_class {main_class!r}" if main_class else "are running"
        raise PluginError(f"{len(found)} JVMs {which}: {names}; give pid" + ("" if main_class else " or main_class"))
    return next(iter(found))


# -- jstat -------------------------------------------------------------------------------------

def _tool(name: str, pid: int | None) -> str | None:
    """A JDK tool: beside the JVM's own java (JDK 9+ layout, or JDK 8's jre/bin), in
    $JAVA_HOME/bin, or on PATH."""
    candidates: list[str] = []
    if pid is not None:
        exe = os.path.realpath(f"/proc/{pid}/exe")  # stays /proc/.../exe when not ours to read
        if os.path.basename(exe) in ("java", "javaw"):
            bindir = os.path.dirname(exe)
            candidates.append(os.path.join(bindir, name))
            if os.path.basename(os.path.dirname(bindir)) == "jre":
                candidates.append(os.path.join(os.path.dirname(os.path.dirname(bindir)), "bin", name))
    if os.environ.get("JAVA_HOME"):
        candidates.append(os.path.join(os.environ["JAVA_HOME"], "bin", name))
    on_path = shutil.which(name)
    if on_path:
        candidates.append(on_path)
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def parse_value(text: str) -> float | None:
    return None if text == "-" else float(text)


class _Samples:
    """jstat's output, line by line: the header gives the columns, each other line a sample."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.columns: list[str] = []
        self.last: dict[str, float | None] | None = None
        self.count = 0
        self.other: list[str] = []  # lines that are neither: jstat's complaints

    def line(self, text: str) -> None:
        words = text.split()
        if not words:
            return
        if not self.columns and all(w[:1].isalpha() for w in words):
            self.columns = words
            self.ctx.out(" ".join(f"{w:>8}" for w in words) + "\n")
        elif self.columns and words == self.columns:
            return  # a repeated header
        elif self.columns and len(words) == len(self.columns):
            try:
                values = [parse_value(w) for w in words]
            except ValueError:
                self.other.append(text)
                return
            self.last = dict(zip(self.columns, values, strict=True))
            self.count += 1
            self.ctx.out(" ".join(f"{w:>8}" for w in words) + "\n")
        else:
            self.other.append(text)


def _complaint(stderr: bytes, other: list[str]) -> str:
    """jstat's message without its Java stack trace."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() + other]
    useful = [line for line in lines if line and not line.startswith(("at ", "..."))]
    return " / ".join(useful[:3]) or "no message"


def run_jstat(ctx: Context, jstat: str, pid: int, samples: int, interval: float) -> _Samples:
    """Run jstat, sending each sample as it comes; stops it on cancel or timeout."""
    argv = [jstat, "-gcutil", str(pid)]
    if samples > 1:
        argv += [str(max(1, round(interval * 1000))), str(samples)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise PluginError(f"cannot run {jstat}: {exc.strerror or exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    parsed, stderr, pending = _Samples(ctx), b"", b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map() and not ctx.stopping:
            for key, _ in sel.select(timeout=0.2):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stderr:
                    stderr = (stderr + data)[-65536:]
                else:
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        parsed.line(line.decode("utf-8", "replace"))
    if ctx.stopping:
        proc.kill()
    code = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    parsed.line(pending.decode("utf-8", "replace"))
    if code != 0 and not ctx.stopping:
        hint = (f" (is pid {pid} a JVM run by the agent's user, and not started with -XX:-UsePerfData?)"
                if "not found" in _complaint(stderr, parsed.other) else "")
        raise PluginError(f"jstat -gcutil {pid} failed (exit {code}): {_complaint(stderr, parsed.other)}{hint}")
    return parsed


@command("java.gc", streams=True, args={
    "pid": Arg(int, default=0, min=0, help="the JVM's process id"),
    "main_class": Arg(str, default="", help="or: its main class (or jar), e.g. Bootstrap"),
    "samples": Arg(int, default=1, min=1, max=100000, help="how many samples"),
    "interval": Arg(float, default=1.0, min=0.01, max=3600, help="seconds between samples"),
})
def gc(ctx: Context, pid: int, main_class: str, samples: int, interval: float) -> dict[str, object] | None:
    """Sample a JVM's garbage collector with jstat -gcutil; the last sample is the result."""
    target = choose_jvm(pid, main_class)
    jstat = _tool("jstat", target)
    if jstat is None:
        raise PluginError(_NO_JSTAT)
    parsed = run_jstat(ctx, jstat, target, samples, interval)
    if parsed.last is None:
        if ctx.stopping:
            return None
        raise PluginError(f"jstat -gcutil {target} printed no sample: {_complaint(b'', parsed.other)}")
    return {"pid": target, **parsed.last}
