"""Following a run from the kernel: a thread drives the SDK's event stream while the caller
(the main thread, or nobody with --bg) renders the view on a timer."""

from __future__ import annotations

import threading
from typing import Any

from .views import View


class Follower:
    def __init__(self, run: Any, view: View, interval: float, render_in_thread: bool):
        self.run = run
        self.view = view
        self.interval = interval
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._render_in_thread = render_in_thread
        self._thread = threading.Thread(target=self._drive, name=f"zyrun-{run.id}", daemon=True)
        self._thread.start()
        if render_in_thread:
            self._ticker = threading.Thread(target=self._tick, name=f"zyrun-view-{run.id}", daemon=True)
            self._ticker.start()

    def _drive(self) -> None:
        try:
            for _ in self.run.events():
                pass
        except BaseException as exc:  # reported to whoever waits
            self.error = exc
        finally:
            self.done.set()

    def _tick(self) -> None:
        while not self.done.wait(self.interval):
            self.view.render()
        self.view.render(final=True)

    def wait_rendering(self) -> None:
        """Block until the run completes, rendering every ``interval``. Interruptible."""
        while not self.done.wait(self.interval):
            self.view.render()
        self.view.render(final=True)
        if self.error is not None:
            raise self.error


class BackgroundRun:
    """What ``%%zyrun --bg`` returns: the run keeps going while you work in other cells.

    ``df`` is the results so far (a fresh DataFrame each time you look); ``wait()`` blocks
    until every target is done and returns the final DataFrame; ``cancel()`` stops it.
    """

    def __init__(self, run: Any, follower: Follower):
        self.run = run
        self._follower = follower

    def __repr__(self) -> str:
        counts = self.run.counts()
        error = self._follower.error
        state = f"failed: {error}" if error is not None else ("done" if self.done else "running")
        return f"<zyrun {self.run.id} {state} {counts}>"

    @property
    def id(self) -> str:
        return str(self.run.id)

    @property
    def done(self) -> bool:
        return self._follower.done.is_set()

    @property
    def df(self) -> Any:
        return self.run.snapshot()

    def wait(self, timeout: float | None = None) -> Any:
        if not self._follower.done.wait(timeout):
            raise TimeoutError(f"run {self.id} is still running")
        if self._follower.error is not None:
            raise self._follower.error
        return self.run.snapshot()

    def cancel(self) -> int:
        return int(self.run.cancel())

    def _repr_html_(self) -> str:
        return f"<code>{self!r}</code>".replace("<zyrun", "&lt;zyrun").replace("}>", "}&gt;")
