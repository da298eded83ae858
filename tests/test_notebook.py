"""notebooks/optlab.ipynb, the notebook path into the pipeline: committed without outputs, and run
top to bottom (QUICK: digits, 3 epochs; the default experiment and two variants through DVC) in a
private copy of the baseline project (tests/project.py), with nbclient and the project's env."""

from __future__ import annotations

import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "optlab.ipynb"
CELL_TIMEOUT_S = 600  # one cell at most: a variant's `dvc exp run` takes about 40 s on digits


def _outputs(cell) -> list[dict]:
    return cell.get("outputs", [])


def _text(cell, mime: str = "text/plain") -> str:
    """Everything a cell printed (its streams) and displayed as ``mime``."""
    parts = [o.get("text", "") for o in _outputs(cell) if o["output_type"] == "stream"]
    parts += [o["data"][mime] for o in _outputs(cell) if mime in o.get("data", {})]
    return "".join(parts)


def _cell(nb, code: str):
    """The one code cell whose source contains ``code``."""
    (found,) = [c for c in nb.cells if c.cell_type == "code" and code in c.source]
    return found


def test_the_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert not [c.id for c in code if c.outputs or c.execution_count is not None], (
        "notebooks/optlab.ipynb holds outputs: commit it stripped (clear every output, no execution counts)"
    )
    assert _cell(nb, "QUICK =").source.count("QUICK = True") == 1, "the committed notebook must default to QUICK"


@pytest.mark.slow
def test_the_notebook_runs_the_experiments_and_shows_the_table_figures_and_ranking(project):
    with project.scratch():
        path = project.root / "notebooks" / "optlab.ipynb"
        path.parent.mkdir(exist_ok=True)
        shutil.copy2(NOTEBOOK, path)
        nb = nbformat.read(path, as_version=4)
        # The kernel starts in the project's root with its env (its venv first on PATH, its own
        # src/ on PYTHONPATH, one thread); a failing cell raises CellExecutionError with its traceback.
        client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3")
        client.execute(cwd=str(project.root), env=project.env)

        names = {}
        for label, call in (
            ("default", "exp_run()"),
            ("rmsprop", '"optimizer=rmsprop"'),
            ("cosine", '"schedule=cosine"'),
        ):
            out = _text(_cell(nb, call))
            # a variant trains and shows its epochs, or DVC restores it from the run cache another test filled
            assert "epoch " in out or "is cached" in out or label == "default", out
            names[label] = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)
        assert project.exp_names() >= set(names.values())

        table = _text(_cell(nb, "dvc.api.exp_show"), "text/html")
        for label in ("rmsprop", "cosine"):
            assert names[label] in table, table
        assert "rmsprop" in table and "cosine" in table and "val_accuracy" in table, table

        figures = [o for o in _outputs(_cell(nb, "display(Image(")) if "image/png" in o.get("data", {})]
        assert len(figures) == 3

        ranking = _text(_cell(nb, 'sh("optlab", "compare"'), "text/markdown")
        assert "## Ranking by test accuracy" in ranking and "| rank | variant |" in ranking, ranking
        assert "optimizer=rmsprop" in ranking and "not enough seeds" in ranking, ranking
