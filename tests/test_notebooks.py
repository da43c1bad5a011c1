"""Every notebook runs end to end with its smoke parameters (papermill), and records finite metrics.

The executed copies land in runs/smoke/notebooks/, where `make test` then runs nbval on them (the
injected smoke parameters are part of the copy, so nbval re-executes the same quick run)."""

import json
import math
from pathlib import Path

import nbformat
import pytest

from moelab import runner

NOTEBOOKS = runner.notebooks()


def _finite(x):
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke_run(nb):
    out = runner.run("smoke", only=nb.stem, progress=False)
    rec = json.loads((out / nb.stem / "metrics.json").read_text())
    head = rec["metrics"]["headline"]
    assert head and all(isinstance(v, (int, float)) and math.isfinite(v) for v in head.values()), head
    assert _finite(rec["metrics"])
    assert rec["seed"] is not None and rec["versions"]["torch"]
    figures = list((out / "figures").glob(f"{nb.stem[:2]}_*.png"))
    assert figures, "the notebook wrote no figure"
    executed = nbformat.read(out / "notebooks" / nb.name, as_version=4)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_shape_and_output_policy(nb):
    """The template of STYLE.md: title, one parameters cell after the imports holding literals only,
    numbered sections, "What we found" and deviations; committed without outputs."""
    book = nbformat.read(nb, as_version=4)
    cells = book.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters`"
    params = cells[tagged[0]]
    assert "import" in cells[tagged[0] - 1].source
    for line in params.source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, rest = line.partition("=")
            value = rest.split("  #")[0].strip()
            compile(value, "<param>", "eval")
            assert "(" not in value or value.startswith(("(", "[")), f"parameters must be literals: {line}"
            assert "  # " in line, f"every parameter has a comment saying what it means: {line}"
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    assert "## 1." in text and "What we found" in text and "Deviations" in text
    for c in cells:
        if c.cell_type == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, "commit notebooks without outputs"
    for preset in runner.PRESETS:
        runner.parameters(nb, preset)  # a parameter file exists for every preset
