"""Every notebook in notebooks/ runs top to bottom as committed, without outputs stored; the
slow ones with their parameters cell (the first) set smaller, as papermill would inject them, so
the suite keeps within its time (every cell still runs)."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# run after each notebook's parameters cell: fewer steps, never fewer kinds of thing
SMALLER = {
    "02-comparison": "BUDGET = 1.0",
    "03-compression": 'BPPS = [1.5, 6.0]\nSTEPS = {"latent": 100, "kan": 50}',
    "05-scaling-law": "ADAM_STEPS, LBFGS_STEPS = 200, 60",
    "06-spectral-bias": "STEPS = 150",
}


def test_the_six_notebooks_are_there():
    assert [p.stem.split("-")[0] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_is_stored_without_outputs(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in book.cells if cell.cell_type == "code")
    if path.stem in SMALLER:
        first = next(i for i, cell in enumerate(book.cells) if cell.cell_type == "code")
        names = [line.split("=")[0].strip() for line in SMALLER[path.stem].splitlines()]
        assert all(name in book.cells[first].source for name in names), "the overrides name the parameters cell's variables"
        book.cells.insert(first + 1, nbformat.v4.new_code_cell(SMALLER[path.stem]))
    nbclient.NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [out for cell in book.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    images = [out for cell in book.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert images, "every notebook shows at least one plot"
