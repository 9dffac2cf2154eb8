"""How a run looks while it runs: a live widget, a text progress line, or nothing.

Views read the run's state (``run.counts()``, ``run.snapshot()``) when they render; they are
throttled by the caller. ``WidgetView`` also carries a ``text/plain`` line in its display
bundle, so where widgets cannot render (nbconvert, papermill) the final line stands in.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from hcsdk import STATUS_COLORS, results_table, status_chip
from hcsdk.protocol.tasks import TaskStatus

__all__ = ["STATUS_COLORS", "NullView", "TextView", "View", "WidgetView", "grouped_output", "progress_line",
           "show_bundle"]


def show_bundle(bundle: dict[str, Any], display_id: bool | None = None) -> Any:
    """IPython's ``display`` of a raw mime bundle; with ``display_id``, the handle that updates
    it in place. IPython ships ``display`` untyped: this is the one way the extension calls it."""
    from IPython.display import display

    typed: Callable[..., Any] = display
    return typed(bundle, raw=True, display_id=display_id)


def _secs(elapsed: float) -> str:
    return f"{elapsed:.2f}s" if elapsed < 10 else f"{elapsed:.0f}s"


def progress_line(run: Any, elapsed: float) -> str:
    counts = run.counts()
    done = run.total - counts.get(TaskStatus.PENDING, 0)
    parts = [f"{k} {v}" for k, v in sorted(counts.items()) if k != TaskStatus.PENDING]
    state = "done" if run.done else "running"
    return f"zyrun {run.id}: {done}/{run.total} {state} ({', '.join(parts) or 'waiting'}) {_secs(elapsed)}"


class View:
    def __init__(self, run: Any):
        self.run = run
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def render(self, final: bool = False) -> None:
        with self._lock:
            self._render(final)

    def _render(self, final: bool) -> None:
        pass

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class NullView(View):
    """--quiet"""


class TextView(View):
    """One progress line: rewritten in place on a terminal, or (``live`` in a kernel) a display
    updated in place by its display_id; elsewhere just the final line."""

    def __init__(self, run: Any, stream: Any = None, live: bool = False):
        super().__init__(run)
        self.stream = stream or sys.stdout
        self._last = ""
        self._handle: Any = None
        if live:
            self._handle = show_bundle({"text/plain": progress_line(run, 0.0)}, display_id=True)

    def _render(self, final: bool) -> None:
        line = progress_line(self.run, self.elapsed)
        if line == self._last and not final:
            return
        self._last = line
        if self._handle is not None:
            self._handle.update({"text/plain": line}, raw=True)
            return
        tty = getattr(self.stream, "isatty", lambda: False)()
        if tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        elif final:
            self.stream.write(line + "\n")
        self.stream.flush()


class WidgetView(View):
    """A progress bar with per-status counts and a table of targets that fills in."""

    def __init__(self, run: Any, max_rows: int = 50):
        super().__init__(run)
        import ipywidgets as w

        self.max_rows = max_rows
        self.bar = w.IntProgress(value=0, min=0, max=max(run.total, 1), description="0/" + str(run.total),
                                 bar_style="info", layout=w.Layout(width="50%"))
        self.label = w.HTML()
        self.table = w.HTML()
        self.box = w.VBox([w.HBox([self.bar, self.label]), self.table])
        self._display_id: Any = None
        self._shown_counts: dict[str, int] | None = None

    def show(self) -> None:
        self._display_id = show_bundle(self._bundle(), display_id=True)

    def _bundle(self) -> dict[str, Any]:
        return {"application/vnd.jupyter.widget-view+json": {"model_id": self.box.model_id, "version_major": 2,
                                                             "version_minor": 0},
                "text/plain": progress_line(self.run, self.elapsed)}

    def _render(self, final: bool) -> None:
        counts = self.run.counts()
        done = self.run.total - counts.get(TaskStatus.PENDING, 0)
        self.bar.value = done
        self.bar.description = f"{done}/{self.run.total}"
        if self.run.done:
            bad = any(k not in (TaskStatus.OK, TaskStatus.PENDING) for k in counts)
            self.bar.bar_style = "warning" if bad else "success"
        self.label.value = _counts_html(counts, self.run.done, self.elapsed)
        if counts != self._shown_counts or final:  # the table only changes when a target ends
            self._shown_counts = counts
            self.table.value = _table_html(self.run.snapshot(), self.max_rows)
        if final and self._display_id is not None:
            self._display_id.update(self._bundle(), raw=True)


def _counts_html(counts: dict[str, int], done: bool, elapsed: float) -> str:
    chips = " ".join(status_chip(k, f"{k} {v}") for k, v in sorted(counts.items()) if k != TaskStatus.PENDING)
    state = "done" if done else f"running, {counts.get('pending', 0)} pending"
    return f"&nbsp;{chips} &nbsp;<span style='color:#555'>{state} · {_secs(elapsed)}</span>"


def _table_html(df: Any, max_rows: int) -> str:
    """The live table: the same readable rows as the final view (problems first), unfinished
    targets as running."""
    if df.empty:
        return ""
    return results_table(df, max_rows=max_rows, table_class="zyrun-table")


def grouped_output(df: Any) -> str:
    """Targets grouped by identical output, the way a person reads 500 hosts' answers."""
    groups: dict[str, list[Any]] = {}
    for r in df.itertuples():
        text = (r.stdout or "") + (("\n[stderr]\n" + r.stderr) if r.stderr else "")
        if r.status != TaskStatus.OK and r.error:
            text += f"\n[{r.status}: {r.error}]"
        groups.setdefault(text, []).append(r)
    blocks = []
    for text, rows in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        hosts = ", ".join(r.hostname for r in rows[:20]) + (f", … ({len(rows) - 20} more)" if len(rows) > 20 else "")
        statuses = ", ".join(sorted({str(r.status) for r in rows}))
        blocks.append(f"── {len(rows)} target{'s' if len(rows) != 1 else ''} ({statuses}): {hosts}\n"
                      f"{text.rstrip() or '(no output)'}")
    return "\n\n".join(blocks)
