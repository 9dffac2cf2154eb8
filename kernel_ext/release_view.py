"""A release in a notebook: shards advancing, targets by phase, and the operator's buttons
(Pause, Continue, Abort, Rollback). It only calls the SDK's ``Release``; a background thread
refreshes it (widget values are safe to set from a thread) until the release is over."""

from __future__ import annotations

import html
import threading
from typing import Any

from hcsdk.protocol.releases import ACTIVE, ReleaseState, TargetStatus

from .views import STATUS_COLORS, show_bundle

#: states where the release may still change by itself
MOVING: tuple[str, ...] = ACTIVE
PHASE_COLORS = {**STATUS_COLORS, "pending": "#1565c0", "rolled_back": "#6a1b9a", "skipped": "#757575"}


def release_line(info: dict[str, Any]) -> str:
    targets = info["targets"]
    ok = sum(t["status"] == TargetStatus.OK for t in targets)
    failed = sum(t["status"] == TargetStatus.FAILED for t in targets)
    shard = min(info["shard"] + 1, info["shards"])
    return (f"release {info['id']} {info['name']} -> {info['dest']}: {info['state']}, shard {shard}/{info['shards']}, "
            f"{ok}/{len(targets)} ok, {failed} failed. {info['message']}")


class ReleaseWidget:
    def __init__(self, release: Any, interval: float = 1.0, max_rows: int = 30) -> None:
        import ipywidgets as w

        self.release = release
        self.interval = interval
        self.max_rows = max_rows
        self.bar = w.IntProgress(min=0, max=max(1, len(release.info["targets"])), description="0 ok")
        self.label = w.HTML()
        self.table = w.HTML()
        self.buttons = {name: w.Button(description=name, layout=w.Layout(width="90px"))
                        for name in ("Pause", "Continue", "Abort", "Rollback")}
        actions = {"Pause": release.pause, "Continue": release.resume, "Abort": release.abort,
                   "Rollback": release.rollback}
        for name, button in self.buttons.items():
            button.on_click(lambda _b, act=actions[name]: self._act(act))
        self.box = w.VBox([w.HBox([self.bar, self.label]), w.HBox(list(self.buttons.values())), self.table])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.render(release.info)

    def _act(self, action: Any) -> None:
        try:
            action()
        except Exception as exc:
            self.label.value = f"<span style='color:#c62828'>{html.escape(str(exc))}</span>"
            return
        self.render(self.release.info)
        self.follow()

    def render(self, info: dict[str, Any]) -> None:
        targets = info["targets"]
        ok = sum(t["status"] == TargetStatus.OK for t in targets)
        self.bar.value = ok
        self.bar.description = f"{ok}/{len(targets)} ok"
        state = info["state"]
        failed = any(t["status"] == TargetStatus.FAILED for t in targets)
        self.bar.bar_style = "success" if state == ReleaseState.DONE and not failed else "warning" if failed else ""
        shard = min(info["shard"] + 1, info["shards"])
        self.label.value = (f"&nbsp;<b>{html.escape(state)}</b> · shard {shard}/{info['shards']} · "
                            f"<span style='color:#555'>{html.escape(info['message'])}</span>")
        enabled = {"Pause": state == ReleaseState.RUNNING, "Continue": state == ReleaseState.PAUSED,
                   "Abort": state in (ReleaseState.RUNNING, ReleaseState.PAUSED),
                   "Rollback": state not in (*MOVING, ReleaseState.ROLLED_BACK)}
        for name, button in self.buttons.items():
            button.disabled = not enabled[name]
        self.table.value = _table(targets, self.max_rows)

    def follow(self) -> None:
        """Refresh in the background while the release moves by itself."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._loop, daemon=True, name="zyrelease")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                info = self.release.refresh()
            except Exception:
                self._stop.wait(self.interval * 3)
                continue
            self.render(info)
            if info["state"] not in MOVING:
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()

    def show(self) -> None:
        show_bundle({"application/vnd.jupyter.widget-view+json": {"model_id": self.box.model_id, "version_major": 2,
                                                                  "version_minor": 0},
                     "text/plain": release_line(self.release.info)})


def _table(targets: list[dict[str, Any]], max_rows: int) -> str:
    rows = []
    for t in targets[:max_rows]:
        color = PHASE_COLORS.get(t["status"], "#000")
        mib = "" if t["bytes"] is None else f"{t['bytes'] / 2**20:.1f}"
        rows.append(f"<tr><td>{html.escape(t['hostname'])}</td><td>{t['shard'] + 1}</td>"
                    f"<td>{html.escape(t['phase'])}</td><td style='color:{color}'>{html.escape(t['status'])}</td>"
                    f"<td>{mib}</td><td style='text-align:left'>{html.escape((t['error'] or '')[:160])}</td></tr>")
    more = len(targets) - max_rows
    tail = f"<tr><td colspan=6>… and {more} more</td></tr>" if more > 0 else ""
    head = "<tr><th>hostname</th><th>shard</th><th>phase</th><th>status</th><th>MiB</th><th>error</th></tr>"
    return f"<table class='zyrun-table'>{head}{''.join(rows)}{tail}</table>"
