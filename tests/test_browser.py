"""The quickstart runbook in a real JupyterLab, driven in Debian's Chromium by Playwright:
the %%zyrun widget must render, reach "done" with a row per target, and the DataFrame show."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from requires import require

from fleet import Fleet

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "zy-browser-test"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

require(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (scripts/setup.sh installs it; or set CHROMIUM)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path, fleet4: Fleet) -> Iterator[str]:
    """JupyterLab on a copy of the runbooks; its kernels find the fleet through ZY_CONFIG."""
    root, home = tmp_path / "notebooks", tmp_path / "home"
    shutil.copytree(NOTEBOOKS, root)
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "receive Jupyter news?" toast over the page
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = {**os.environ, "ZY_CONFIG": str(fleet4.config_path), "JUPYTER_CONFIG_DIR": str(home / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(home / "rt"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "ws")}
    port = _free_port()
    log = open(tmp_path / "lab.log", "w")  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()) from None
            time.sleep(0.3)
    try:
        yield base
    finally:
        try:
            req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {TOKEN}"})
            urllib.request.urlopen(req, timeout=10).close()
            proc.wait(timeout=20)
        except Exception:
            proc.kill()
            proc.wait()
        log.close()


def test_quickstart_in_jupyterlab_renders_the_widget_and_the_dataframe(lab: str, tmp_path: Path) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    idle = re.compile(r"\) \| Idle")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{lab}/lab/tree/quickstart.ipynb?token={TOKEN}")
            panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
            # the status bar's "| Idle" appears only once the kernel is really connected
            expect(page.locator(".jp-StatusBar-Widget", has_text=idle)).to_be_visible(timeout=90_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()

            cell = panel.locator(".jp-CodeCell", has_text="%%zyrun -t targets -o res")
            out = cell.locator(".jp-OutputArea-output")
            bar = out.locator(".jupyter-widgets.widget-hprogress .progress-bar")
            expect(bar).to_have_attribute("style", re.compile(r"width: 100%"))
            expect(out.locator(".widget-html", has_text="done")).to_be_visible()
            expect(out.locator("table.zyrun-table tr")).to_have_count(4)  # a header and 3 targets
            expect(out.locator("table.dataframe")).to_be_visible()  # the DataFrame, rendered
            expect(out.locator("table.dataframe tbody tr")).to_have_count(3)
            expect(out.filter(has_text="Loading widget")).to_have_count(0)
            # Run All went through to the last cell without an error anywhere
            last = panel.locator(".jp-CodeCell").last
            expect(last.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=90_000)
            expect(panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                 has_text="Error")).to_have_count(0)
            cell.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "quickstart.png"))
            if os.environ.get("ZY_SCREENSHOT"):
                shutil.copy(tmp_path / "quickstart.png", os.environ["ZY_SCREENSHOT"])
        except (AssertionError, PlaywrightError):
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
