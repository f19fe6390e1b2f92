"""Every notebook runs top to bottom headless, on the CPU, with a tiny model, where the browser test cannot run.

tests/test_browser.py runs the same notebooks in JupyterLab in Chromium and asserts all of this and what the page
shows; where it can run, these tests skip, so each notebook runs once per suite (about 10 s each, kernel start
included, on 2 idle cores).
"""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import NOTEBOOKS, browser_missing, tiny_notebook


@pytest.mark.skipif(browser_missing() is None, reason="run in JupyterLab in Chromium by tests/test_browser.py")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(tiny_notebook(path, tmp_path), as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "ws" / "capture" / "record.json").is_file()


def test_there_are_notebooks():
    assert NOTEBOOKS
