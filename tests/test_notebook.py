"""Executes notebooks/quickstart.ipynb end to end in a fresh kernel (CPU: the kernel inherits
JAX_PLATFORMS=cpu from conftest) and checks every cell ran and the RL cell reported its steps."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def _text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    # cwd = notebooks/ so that "../configs/tiny.py" resolves
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"notebook cell raised: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert all(c.get("execution_count") for c in code_cells), "a code cell did not run"

    sample_text = next(_text_of(c) for c in code_cells if "BlockDiffusionSampler" in c.source)
    trace = [int(x) for x in re.search(r"trace: \[([\d, ]*)\]", sample_text).group(1).split(",") if x.strip()]
    generated = int(re.search(r"generated tokens: (\d+)", sample_text).group(1))
    assert 0 < generated == len(trace) and min(trace) >= 1

    html_outputs = [o for c in code_cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert html_outputs and "<script" in html_outputs[0]["data"]["text/html"]

    rl_text = next(_text_of(c) for c in code_cells if "RLTrainer(" in c.source)
    steps = [int(s) for s in re.findall(r"RL step (\d+):", rl_text)]
    assert steps == [1, 2], rl_text
    rewards = [float(r) for r in re.findall(r"reward=([-\d.]+)", rl_text)]
    assert all(0.0 <= r <= 1.0 for r in rewards)

    plot_outputs = [o for o in code_cells[-1].get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(plot_outputs) == 1, "the plot cell should show one figure"
