"""Executes a jupytext percent-format notebook (notebooks/NN_name.py) top to bottom in a fresh kernel, the way a user
would run it: from the repository root, on the machine's own devices (the 8 fake CPU devices the test suite forces
are not passed on), with SUPERLM_SMOKE=1 unless `full`.

  .venv/bin/python -m tests.notebooks.runner notebooks/01_train_and_sample.py [--full]

prints each code cell's wall time and the total, and exits non-zero at the first failing cell.
"""

import argparse
import os
import pathlib
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
SMOKE_ENV = "SUPERLM_SMOKE"


def notebook_sources() -> list[pathlib.Path]:
  return sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def kernel_env(smoke: bool) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", SMOKE_ENV)}
  env["JAX_PLATFORMS"] = "cpu" if "JAX_PLATFORMS" not in os.environ else os.environ["JAX_PLATFORMS"]
  if smoke:
    env[SMOKE_ENV] = "1"
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  return env


def execute(source: pathlib.Path, *, smoke: bool = True, cell_timeout: int = 900, log=print) -> nbformat.NotebookNode:
  """Runs the notebook; returns it with outputs. Raises nbclient's CellExecutionError on the first failing cell."""
  nb = jupytext.read(source)
  saved = dict(os.environ)
  os.environ.clear()
  os.environ.update(kernel_env(smoke))  # The kernel inherits this process's environment.
  try:
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    with client.setup_kernel():
      start = time.perf_counter()
      for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
          continue
        t0 = time.perf_counter()
        client.execute_cell(cell, index)
        log(f"  cell {index:2d}: {time.perf_counter() - t0:6.1f} s  {cell.source.splitlines()[0][:70] if cell.source else ''}")
      log(f"{source.name}: {time.perf_counter() - start:.1f} s ({'smoke' if smoke else 'full'})")
  finally:
    os.environ.clear()
    os.environ.update(saved)
  return nb


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
  parser.add_argument("--full", action="store_true", help="without SUPERLM_SMOKE: the sizes a Colab run uses")
  parser.add_argument("--save", type=pathlib.Path, help="write the executed notebook(s) (.ipynb, with outputs) here")
  args = parser.parse_args()
  for source in args.notebooks:
    nb = execute(source.resolve(), smoke=not args.full, cell_timeout=3600 if args.full else 900)
    if args.save:
      args.save.mkdir(parents=True, exist_ok=True)
      nbformat.write(nb, args.save / (source.stem + ".ipynb"))
  sys.exit(0)


if __name__ == "__main__":
  main()
