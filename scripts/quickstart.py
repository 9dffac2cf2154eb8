"""The main job on the embedded default: a local fleet (a master with SQLite and its own CA,
and four labelled agents, as real processes), then the quickstart runbook executed against it.

    .venv/bin/python scripts/quickstart.py [--keep] [--out out/]

The executed notebook and an HTML copy land in --out. The fleet is stopped at the end unless
--keep is given (then `make lab` opens JupyterLab on it, and `zy fleet down` stops it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from hcsdk.localfleet import fleet_down, fleet_up

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description="run the quickstart runbook on a local fleet")
    ap.add_argument("--keep", action="store_true", help="leave the fleet running afterwards")
    ap.add_argument("--root", type=Path, default=ROOT / "state" / "fleet", help="where the fleet lives")
    ap.add_argument("--out", type=Path, default=ROOT / "out", help="where the executed notebooks go")
    ap.add_argument("--notebook", action="append", default=None,
                    help="runbook(s) to execute (default: notebooks/quickstart.ipynb)")
    args = ap.parse_args()
    notebooks = [Path(n) for n in args.notebook] if args.notebook else [ROOT / "notebooks" / "quickstart.ipynb"]
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    state = fleet_up(args.root)
    print(f"fleet: master {state['url']} with {len(state['pids']) - 1} agents ({time.perf_counter() - t0:.1f}s)")
    failed = False
    try:
        for nb in notebooks:
            failed |= not execute(nb, args.out, state["config"])
    finally:
        if args.keep:
            print(f"fleet left running: export ZY_CONFIG={state['config']}; `make lab`; `zy fleet down`")
        else:
            fleet_down(args.root)
    return 1 if failed else 0


def execute(notebook: Path, out: Path, config: str) -> bool:
    import papermill

    target = out / notebook.name
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(target), parameters={"zy_config": config},
                                   progress_bar=False, cwd=str(notebook.parent))
    except papermill.PapermillExecutionError as exc:
        print(f"{notebook.name}: FAILED in cell {exc.exec_count}: {exc.ename}: {exc.evalue}", file=sys.stderr)
        return False
    finally:
        if target.exists():
            html_copy(target)
    print(f"{notebook.name}: executed in {time.perf_counter() - t0:.1f}s -> {target} and {target.with_suffix('.html')}")
    return True


def html_copy(notebook: Path) -> None:
    """An HTML copy that reads offline: live widgets need a kernel, so the HTML shows the text
    progress line each widget display carries instead."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            out.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
    nb.metadata.pop("widgets", None)
    static = notebook.with_suffix(".static.ipynb")
    nbformat.write(nb, static)
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", str(static), "--output",
                    notebook.with_suffix(".html").name, "--log-level", "WARN"], check=False)
    static.unlink()


if __name__ == "__main__":
    sys.exit(main())
