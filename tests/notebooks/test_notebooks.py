"""The notebooks (issue 18) are code: each `notebooks/NN_name.py` (jupytext percent format, the source of truth) has
its `.ipynb` twin in sync and without outputs, starts with the same set-up cell, is linked from the README, and runs
top to bottom in a fresh kernel with SUPERLM_SMOKE=1 on this machine's CPU, drawing real figures.
"""

import pathlib

import jupytext
import nbformat
import pytest

from tests.notebooks.runner import REPO, execute, notebook_sources

SOURCES = notebook_sources()
EXPECTED = ["01_train_and_sample", "02_attention_and_mla", "03_moe_routing", "04_hf_roundtrip"]


def cells(nb) -> list[tuple[str, str]]:
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_the_four_notebooks_exist():
  assert [p.stem for p in SOURCES] == EXPECTED


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_in_sync_with_its_source_and_has_no_outputs(source: pathlib.Path):
  twin = source.with_suffix(".ipynb")
  assert twin.is_file(), f"{twin.name} missing: run `make notebooks`"
  ipynb = nbformat.read(twin, as_version=4)
  assert cells(ipynb) == cells(jupytext.read(source)), f"{twin.name} differs from {source.name}: run `make notebooks`"
  for cell in ipynb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{twin.name} has outputs: run `make notebooks`"


def test_every_notebook_starts_with_the_same_set_up_cell():
  first = {p.stem: next(c.source for c in jupytext.read(p).cells if c.cell_type == "code") for p in SOURCES}
  assert len(set(first.values())) == 1, "the set-up cells differ: " + ", ".join(first)
  setup = next(iter(first.values()))
  assert "google.colab" in setup and "REPO_URL = " in setup and "SUPERLM_SMOKE" in setup


def test_the_readme_opens_each_notebook_in_colab():
  readme = (REPO / "README.md").read_text()
  for source in SOURCES:
    assert f"colab.research.google.com/github/" in readme and f"notebooks/{source.stem}.ipynb" in readme, source.stem


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_smoke_mode(source: pathlib.Path):
  nb = execute(source, smoke=True, cell_timeout=600, log=lambda line: None)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  plots = sum("plt.show()" in c.source for c in nb.cells if c.cell_type == "code")
  assert len(figures) >= plots >= 1, f"{plots} plt.show() calls drew {len(figures)} figures"
