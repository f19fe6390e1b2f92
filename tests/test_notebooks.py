"""Every notebook runs top to bottom headless, on the CPU, with a tiny model."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _set_parameters(nb, **values):
    """Replace the cell tagged `parameters` (the papermill convention) with test values."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "each notebook has exactly one parameters cell"
    cells[0].source = "\n".join(f"{k} = {v!r}" for k, v in values.items())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    _set_parameters(nb, MODEL="tiny-llama", WORKSPACE=str(tmp_path / "ws"))
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "ws" / "capture" / "record.json").is_file()


def test_there_are_notebooks():
    assert NOTEBOOKS
