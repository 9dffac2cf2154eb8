"""Every runbook in notebooks/ executes clean against a local fleet (papermill)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import papermill
import pytest

from fleet import Fleet

# dr-drill.ipynb starts its own PostgreSQL pair and masters: tests/test_dr_drill.py runs it
NOTEBOOKS = sorted(p for p in (Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")
                   if p.name != "dr-drill.ipynb")


def test_there_are_runbooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "fleet-health.ipynb", "sampling.ipynb", "release.ipynb"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_runbook_executes_clean(notebook: Path, fleet4: Fleet, tmp_path: Path) -> None:
    source = nbformat.read(notebook, as_version=4)
    tags = [c.metadata.get("tags", []) for c in source.cells]
    assert any("parameters" in t for t in tags), "a runbook needs a cell tagged 'parameters'"
    assert all(c.cell_type != "code" or not c.get("outputs") for c in source.cells), "commit runbooks cleared"
    out = tmp_path / notebook.name
    papermill.execute_notebook(str(notebook), str(out), parameters={"zy_config": str(fleet4.config_path)},
                               progress_bar=False, kernel_name="python3", cwd=str(tmp_path))
    executed = nbformat.read(out, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    streams = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs
                      if o.output_type == "stream" and o.get("name") == "stderr")
    assert "UsageError" not in streams
    # where widgets cannot render (papermill, nbconvert) the final progress line stands in
    lines = [o["data"]["text/plain"] for c in executed.cells if c.cell_type == "code" for o in c.outputs
             if o.output_type == "display_data" and "application/vnd.jupyter.widget-view+json" in o["data"]]
    if notebook.name == "quickstart.ipynb":
        assert any(re.search(r"zyrun r\w+: 3/3 done \(ok 3\)", line) for line in lines), lines
