"""How a person reads a run's results: the readable view of ``Run.to_dataframe()``.

Pure formatting, nothing else: a DataFrame in the shape ``to_dataframe()`` makes goes in, an HTML
string or a text table comes out. The DataFrame itself is never changed (it is data); the view
puts the hostname first, shortens uuids to 8 characters, keeps output's line breaks (folding
long output in a ``<details>`` element, the full text one click away), shows times as local
HH:MM:SS and colours the status. Everything that came from a target (output, hostnames,
errors) is HTML-escaped and stripped of terminal escapes: commands print hostile text.

pandas is imported only when a view renders, so importing hcsdk stays cheap for the agent.
"""

from __future__ import annotations

import html
import json
import re
import weakref
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any, NamedTuple

from hcsdk.protocol.tasks import TaskStatus

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["STATUS_COLORS", "ResultView", "readable", "results_table", "status_chip", "view"]

#: text colour, chip background per status (ok green, failed/error red, timeout/offline orange,
#: cancelled grey); the chip keeps its own background, so it reads on light and dark themes
#: (public, so its keys stay the plain strings a DataFrame holds; the private tables below keep
#: the members, which look up like their values)
STATUS_COLORS: dict[str, str] = {status.value: color for status, color in {
    TaskStatus.OK: "#1b5e20", TaskStatus.FAILED: "#b71c1c", TaskStatus.ERROR: "#b71c1c", TaskStatus.TIMEOUT: "#bf360c",
    TaskStatus.OFFLINE: "#bf360c", TaskStatus.CANCELLED: "#424242", TaskStatus.RUNNING: "#0d47a1",
    TaskStatus.PENDING: "#37474f"}.items()}
_CHIP_BG: dict[str, str] = {
    TaskStatus.OK: "#e8f5e9", TaskStatus.FAILED: "#ffebee", TaskStatus.ERROR: "#ffebee", TaskStatus.TIMEOUT: "#fff3e0",
    TaskStatus.OFFLINE: "#fff3e0", TaskStatus.CANCELLED: "#eeeeee", TaskStatus.RUNNING: "#e3f2fd",
    TaskStatus.PENDING: "#eceff1"}
#: problems first: that is what a person looks for in 500 hosts' answers
_ORDER: dict[str, int] = {
    TaskStatus.FAILED: 0, TaskStatus.ERROR: 0, TaskStatus.TIMEOUT: 1, TaskStatus.OFFLINE: 2, TaskStatus.CANCELLED: 2,
    TaskStatus.RUNNING: 3, TaskStatus.PENDING: 3, TaskStatus.OK: 4}

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_PRE = "white-space:pre-wrap;overflow-wrap:anywhere;font-family:var(--jp-code-font-family,monospace);" \
       "font-size:0.92em;line-height:1.35;margin:0;text-align:left"
_CELL = "text-align:left;vertical-align:baseline;padding:3px 6px;border-bottom:1px solid rgba(128,128,128,0.25)"
_NOTE = "color:#757575;font-style:italic"
# hides the "… N more lines" hint once the fold is open; without it (a sanitiser dropped the
# <style>) the hint simply stays visible
_STYLE = "<style>.zy-fold[open] > summary .zy-more{display:none}</style>"
# display:block drops the disclosure triangle (it would sit on the first line only): the hint
# under the preview is what to click
_SUMMARY = "display:block;list-style:none;cursor:pointer"
_HINT = "color:#1565c0;font-style:italic"


def clean(text: str) -> str:
    """Output as a terminal would show it: CRLF as LF, a carriage return overwriting its line,
    colour escapes dropped, other control characters made visible (U+2400 pictures)."""
    text = _ANSI.sub("", text.replace("\r\n", "\n"))
    if "\r" in text:  # a progress bar: what stays on screen is the last thing written
        text = "\n".join(_last_overwrite(line) for line in text.split("\n"))
    return _CONTROL.sub(lambda m: chr(0x2421) if m.group() == "\x7f" else chr(0x2400 + ord(m.group())), text)


def _last_overwrite(line: str) -> str:
    parts = [p for p in line.split("\r") if p]
    return parts[-1] if parts else ""


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, dict, list, tuple, bool)):
        return False
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _short_secs(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _size(chars: int) -> str:
    return f"{chars} chars" if chars < 1024 else f"{chars / 1024:.1f} KiB"


class _Row:
    """One target, as the view shows it."""

    def __init__(self, rec: dict[str, Any], tz: tzinfo | None):
        def get(key: str) -> Any:
            value = rec.get(key)
            return None if _missing(value) else value

        self.hostname = clean(str(get("hostname") or ""))  # agents report their own: hostile too
        self.uuid = clean(str(get("uuid") or ""))
        started, finished = get("started_at"), get("finished_at")
        self.started = _local(started, tz) if started is not None else None
        status = get("status")
        self.status = TaskStatus.RUNNING.value if status is None else clean(str(status))
        code = get("exit_code")
        self.exit = "" if code is None else str(int(code))
        duration = get("duration_s")
        if duration is None and started is not None and finished is not None:
            duration = (finished - started).total_seconds()
        self.took = "" if duration is None else _short_secs(float(duration))
        self.stdout = clean(str(get("stdout") or "")).rstrip("\n")
        self.stderr = clean(str(get("stderr") or "")).rstrip("\n")
        self.error = clean(str(get("error") or ""))
        self.truncated = bool(get("truncated"))
        result = get("result")
        self.result = "" if result is None else clean(json.dumps(result, default=str, ensure_ascii=False))

    @property
    def order(self) -> tuple[int, str]:
        return _ORDER.get(self.status, 3), self.hostname


def _local(value: Any, tz: tzinfo | None) -> datetime:
    """A timestamp (aware, as to_dataframe's are, in UTC; naive taken as UTC) in timezone ``tz``
    (None: this machine's, with its own DST rules for each timestamp)."""
    when = value.to_pydatetime(warn=False) if hasattr(value, "to_pydatetime") else value  # drops the ns
    if isinstance(when, (int, float)):
        when = datetime.fromtimestamp(when, UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(tz)  # type: ignore[no-any-return]


def _records(df: pd.DataFrame, tz: tzinfo | None) -> list[_Row]:
    return [_Row(rec, tz) for rec in df.to_dict("records")]


def status_chip(status: str, text: str | None = None) -> str:
    """A status as a coloured chip (HTML)."""
    color, bg = STATUS_COLORS.get(status, "#212121"), _CHIP_BG.get(status, "#f5f5f5")
    return (f'<span style="color:{color};background:{bg};border-radius:3px;padding:0 5px;font-weight:600;'
            f'white-space:nowrap">{html.escape(text if text is not None else status)}</span>')


def _fold_at(text: str, lines: int, chars: int) -> int | None:
    """Where to fold ``text`` (after ``lines`` lines or ``chars`` characters), or None if it fits."""
    pos = 0
    for _ in range(lines):
        nl = text.find("\n", pos)
        if nl == -1:
            pos = len(text)
            break
        pos = nl + 1
    cut = min(pos, chars)
    return cut if text[cut:].strip() else None


def _more(rest: str) -> str:
    n = rest.count("\n") + (0 if rest.endswith("\n") else 1)
    return f"▸ {n} more lines ({_size(len(rest))})" if n > 1 else f"▸ {_size(len(rest))} more"


def _block_html(text: str, style: str, opts: _Opts) -> str:
    shown, dropped = text[:opts.max_chars], len(text) - opts.max_chars
    cut = _fold_at(shown, opts.fold_lines, opts.fold_chars)
    if cut is None:
        out = f'<div style="{_PRE};{style}">{html.escape(shown)}</div>'
    else:
        head, rest = shown[:cut], shown[cut:]
        out = (f'<details class="zy-fold"><summary style="{_PRE};{_SUMMARY};{style}">{html.escape(head)}'
               f'<span class="zy-more" style="{_HINT}">{"" if head.endswith(chr(10)) else chr(10)}'
               f'{html.escape(_more(rest))}</span></summary>'
               f'<div style="{_PRE};{style}">{html.escape(rest)}</div></details>')
    if dropped > 0:
        out += f'<div style="{_NOTE}">… {_size(dropped)} more not shown: the DataFrame has all of it</div>'
    return out


class _Opts(NamedTuple):
    fold_lines: int  # a longer output is folded after this many lines...
    fold_chars: int  # ...or characters
    max_chars: int  # past this, not even the fold holds it (the page would choke): the DataFrame does


def _output_html(row: _Row, opts: _Opts) -> str:
    parts = []
    if row.stdout:
        parts.append(_block_html(row.stdout, "", opts))
    if row.stderr:
        parts.append(_block_html(row.stderr, "color:#b71c1c;border-left:2px solid #ef9a9a;padding-left:4px", opts))
    if row.error:
        parts.append(_block_html(row.error, f"color:{STATUS_COLORS.get(row.status, '#b71c1c')};font-style:italic",
                                 opts))
    if row.result:
        parts.append(_block_html("result: " + row.result, "color:#616161", opts))
    if row.truncated:
        parts.append(f'<div style="{_NOTE}">output truncated by the agent</div>')
    return "".join(parts) or f'<span style="{_NOTE}">no output</span>'


_HEADS = (("hostname", "left"), ("uuid", "left"), ("status", "left"), ("exit", "right"), ("started", "left"),
          ("took", "right"), ("output", "left"))


def results_table(df: pd.DataFrame, *, max_rows: int | None = 200, sort: bool = True,
                  table_class: str = "zy-result", fold_lines: int = 6, fold_chars: int = 320,
                  max_chars: int = 64_000, tz: tzinfo | None = None) -> str:
    """The results as one HTML table that fits its container's width (a fixed layout: long
    lines wrap instead of widening it); unfinished targets show as running. Rows past
    ``max_rows`` are counted in a last row, not shown."""
    rows = _records(df, tz)
    if sort:
        rows.sort(key=lambda r: r.order)
    opts = _Opts(fold_lines, fold_chars, max_chars)
    host_ch = min(max([len(r.hostname) for r in rows] + [8]) + 2, 30)
    widths = [f"{host_ch}ch", "10ch", "11ch", "5ch", "10ch", "8ch", "auto"]
    cols = "".join(f'<col style="width:{w}">' for w in widths)
    zone = next((f' title="local time, {html.escape(f"{r.started:%Z (UTC%z)}")}"'
                 for r in rows if r.started is not None), "")
    head = "".join(f'<th style="{_CELL};text-align:{align};font-weight:600"{zone if name == "started" else ""}>'
                   f'{name}</th>' for name, align in _HEADS)
    shown = rows if max_rows is None else rows[:max_rows]
    body = "".join(_row_html(r, opts) for r in shown)
    more = len(rows) - len(shown)
    tail = (f'<tr><td colspan="7" style="{_CELL};{_NOTE}">… and {more} more targets (the DataFrame has them '
            f'all)</td></tr>' if more > 0 else "")
    return (f'<table class="{html.escape(table_class)}" style="table-layout:fixed;width:100%;'
            f'border-collapse:collapse;margin:0">'
            f'<colgroup>{cols}</colgroup><thead><tr>{head}</tr></thead><tbody>{body}{tail}</tbody></table>')


def _row_html(r: _Row, opts: _Opts) -> str:
    started = "" if r.started is None else (
        f'<span title="{html.escape(r.started.isoformat(sep=" ", timespec="milliseconds"))}">'
        f'{r.started:%H:%M:%S}</span>')
    mono = "font-family:var(--jp-code-font-family,monospace);font-size:0.92em"
    return (f'<tr><td style="{_CELL};overflow-wrap:anywhere;font-weight:600">{html.escape(r.hostname)}</td>'
            f'<td style="{_CELL};{mono}" title="{html.escape(r.uuid)}">{html.escape(r.uuid[:8])}</td>'
            f'<td style="{_CELL}">{status_chip(r.status)}</td>'
            f'<td style="{_CELL};text-align:right">{r.exit}</td>'
            f'<td style="{_CELL};white-space:nowrap">{started}</td>'
            f'<td style="{_CELL};text-align:right;white-space:nowrap">{r.took}</td>'
            f'<td style="{_CELL}">{_output_html(r, opts)}</td></tr>')


def _counts(rows: list[_Row]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (_ORDER.get(kv[0], 3), kv[0])))


def _when(rows: list[_Row]) -> str:
    """When the run started, and in which timezone the times are."""
    starts = [r.started for r in rows if r.started is not None]
    if not starts:
        return ""
    first = min(starts)
    return f"started {first:%Y-%m-%d %H:%M:%S} {first.tzname() or format(first, 'UTC%z')}"


class ResultView:
    """The readable view of a run's results; ``df`` is the DataFrame, untouched.

    In Jupyter it renders as an HTML table that fits the page (``_repr_html_``); elsewhere, and
    in ``text/plain`` outputs, as a text table (``repr``/``str``). Problems are listed first
    unless ``sort=False``; ``max_rows=None`` shows every target.
    """

    def __init__(self, df: pd.DataFrame, *, max_rows: int | None = 200, sort: bool = True, fold_lines: int = 6,
                 fold_chars: int = 320, tz: tzinfo | None = None, width: int = 100):
        self.df = df
        self.max_rows = max_rows
        self.sort = sort
        self.fold_lines = fold_lines
        self.fold_chars = fold_chars
        self.tz = tz
        self.width = width

    def _rows(self) -> list[_Row]:
        rows = _records(self.df, self.tz)
        if self.sort:
            rows.sort(key=lambda r: r.order)
        return rows

    def summary(self) -> str:
        rows = self._rows()
        counts = ", ".join(f"{k} {v}" for k, v in _counts(rows).items())
        when = _when(rows)
        return f"{len(rows)} target{'s' if len(rows) != 1 else ''}: {counts or 'none'}" + (f" · {when}" if when else "")

    def to_html(self) -> str:
        rows = self._rows()
        chips = " ".join(status_chip(k, f"{k} {v}") for k, v in _counts(rows).items())
        when = html.escape(_when(rows))
        caption = (f'<div style="margin:2px 0 4px">{len(rows)} target{"s" if len(rows) != 1 else ""} '
                   f'{chips}<span style="color:#757575"> {"· " + when if when else ""}</span></div>')
        table = results_table(self.df, max_rows=self.max_rows, sort=self.sort, table_class="dataframe zy-result",
                              fold_lines=self.fold_lines, fold_chars=self.fold_chars, tz=self.tz)
        return f'<div class="zy-result-view" style="max-width:100%">{_STYLE}{caption}{table}</div>'

    def to_text(self) -> str:
        return text_table(self._rows(), self.summary(), self.max_rows, self.fold_lines, self.width)

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/html": self.to_html(), "text/plain": self.to_text()}

    def __repr__(self) -> str:
        return self.to_text()

    __str__ = __repr__


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def _output_lines(r: _Row, fold_lines: int) -> list[str]:
    lines = r.stdout.split("\n") if r.stdout else []
    lines += ["[stderr] " + line for line in r.stderr.split("\n")] if r.stderr else []
    lines += [f"[{r.status}: {line}]" for line in r.error.split("\n")] if r.error else []
    lines += ["result: " + r.result] if r.result else []
    lines += ["(output truncated by the agent)"] if r.truncated else []
    if len(lines) > fold_lines + 1:
        lines = lines[:fold_lines] + [f"… {len(lines) - fold_lines} more lines"]
    return [line.expandtabs() for line in lines] or ["(no output)"]  # a tab would break the columns


def text_table(rows: list[_Row], summary: str, max_rows: int | None, fold_lines: int, width: int) -> str:
    """The results as a text table about ``width`` columns wide; each output line its own line."""
    host_w = min(max([len(r.hostname) for r in rows] + [8]), 24)
    stat_w = max([len(r.status) for r in rows] + [6])
    fixed = [("hostname", host_w), ("uuid", 8), ("status", stat_w), ("exit", 4), ("started", 8), ("took", 7)]
    out_w = max(width - sum(w + 2 for _, w in fixed), 20)
    pad = " " * sum(w + 2 for _, w in fixed)

    def line(cells: list[str]) -> str:
        left = "".join((c.rjust(w) if name in ("exit", "took") else c.ljust(w)) + "  "
                       for c, (name, w) in zip(cells, fixed, strict=False))
        return (left + cells[-1]).rstrip()

    out = [summary, line([name for name, _ in fixed] + ["output"])]
    shown = rows if max_rows is None else rows[:max_rows]
    for r in shown:
        started = "" if r.started is None else f"{r.started:%H:%M:%S}"
        outs = [_cut(x, out_w) for x in _output_lines(r, fold_lines)]
        out.append(line([_cut(r.hostname, host_w), r.uuid[:8], r.status, r.exit, started, r.took, outs[0]]))
        out.extend((pad + x).rstrip() for x in outs[1:])
    if max_rows is not None and len(rows) > max_rows:
        out.append(f"… and {len(rows) - max_rows} more targets (the DataFrame has them all)")
    return "\n".join(out)


def view(data: Any, **options: Any) -> ResultView:
    """The readable view of a run's results: ``data`` is a DataFrame from ``to_dataframe()``/
    ``snapshot()`` (or a run, whose results so far are taken). Options: see :class:`ResultView`."""
    if hasattr(data, "snapshot") and not hasattr(data, "columns"):
        data = data.snapshot()
    return ResultView(data, **options)


def readable(df: pd.DataFrame, **options: Any) -> pd.DataFrame:
    """``df`` itself, now shown in IPython/Jupyter as its :class:`ResultView` (rendered when it is
    displayed, from the data then). The data, the columns and the class stay exactly as they
    were; a copy or a selection of it (``df[...]``, ``df.copy()``) renders as pandas does."""
    ref = weakref.ref(df)  # no cycle through the frame's own __dict__

    def bundle(include: Any = None, exclude: Any = None) -> dict[str, str] | None:
        frame = ref()
        return None if frame is None else ResultView(frame, **options)._repr_mimebundle_()

    # an instance attribute, not a subclass: IPython looks the method up on the object, pandas
    # keeps it out of copies, pickles and selections
    object.__setattr__(df, "_repr_mimebundle_", bundle)
    return df
