"""Every notebook runs top to bottom on CPU in reduced size (SPECPV_QUICK=1), outputs stripped in git."""

from __future__ import annotations

import pathlib

import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist_with_stripped_outputs():
    assert {p.name for p in NOTEBOOKS} == {"quickstart.ipynb", "long_context_specpv.ipynb",
                                           "train_draft_head.ipynb", "convert_checkpoint.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: outputs"


# The training notebook repeats what tests/test_train.py checks; it runs with `make test-slow`. (The
# long-context one, 31 s, runs in `make test`: it calls bench functions that tests alone would not keep it in
# step with.)
SLOW_NOTEBOOKS = {"train_draft_head"}


TORCH_NOTEBOOKS = {"convert_checkpoint"}  # saves a random model with transformers (PyTorch)


def notebook_marks(stem: str) -> list:
    return [mark for mark, stems in ((pytest.mark.slow, SLOW_NOTEBOOKS), (pytest.mark.torch, TORCH_NOTEBOOKS))
            if stem in stems]


@pytest.mark.parametrize("path", [pytest.param(p, marks=notebook_marks(p.stem)) for p in NOTEBOOKS],
                         ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("SPECPV_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
