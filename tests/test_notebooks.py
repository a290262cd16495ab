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


INSTALLS = [  # the preinstalled jax (None: none), plugin modules installed -> the jax requirement pip is given
    ("0.11.2", {"jax_cuda12_plugin"}, None),
    ("0.10.2", set(), None),
    ("0.9.1", {"jax_cuda12_plugin"}, "jax[cuda12]"),
    ("0.12.0", {"jax_cuda13_plugin", "jax_cuda12_plugin"}, "jax[cuda13]"),
    ("0.8.0", {"libtpu"}, "jax[tpu]"),
    (None, set(), "jax"),
]


@pytest.mark.parametrize("version, modules, jax", INSTALLS)
def test_install_cell_replaces_a_jax_out_of_range_with_its_plugin(version, modules, jax, monkeypatch):
    """Every notebook's install cell leaves a jax in pyproject's range alone and otherwise names jax with the
    plugin installed beside it (pip would replace jax alone, leaving a plugin that does not match it)."""
    import importlib.metadata
    import importlib.util
    import subprocess
    import tomllib

    cells = {"".join(nbformat.read(p, as_version=4).cells[1].source) for p in NOTEBOOKS}
    assert len(cells) == 1
    (cell,) = cells
    pyproject = tomllib.loads((NOTEBOOKS[0].parent.parent / "pyproject.toml").read_text())
    (jax_range,) = [d.removeprefix("jax") for d in pyproject["project"]["dependencies"] if d.startswith("jax>")]

    def version_of(name):
        if name != "jax" or version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    pip = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in modules else None)
    monkeypatch.setattr(importlib.metadata, "version", version_of)
    monkeypatch.setattr(subprocess, "run", lambda args, check: pip.append(args))
    exec(cell, {})
    (args,) = pip
    assert args[1:5] == ["-m", "pip", "install", "-q"] and args[-1].startswith("git+")
    assert args[5:-1] == ([] if jax is None else [jax + jax_range])


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
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # nor a warning of ours (quickstart gave mode="ar" the EAGLE-3 head: "the draft has no effect")
    assert not [o.text for o in outputs if o.output_type == "stream" and "SpecPVWarning" in o.text]
