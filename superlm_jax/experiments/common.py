"""Report plumbing shared by the studies in this package: reading a run's metrics, markdown tables, the machine
line, JSON-safe reports, and the command line (`--config`, `--quiet`)."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np

from superlm_jax.errors import UserError


def read_metrics(workdir: str | Path) -> dict[str, list[tuple[int, dict]]]:
  """metrics.jsonl records by split ('train', 'val'), as (step, record) in step order."""
  out: dict[str, list[tuple[int, dict]]] = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      out.setdefault(record["split"], []).append((record["step"], record))
  return {split: sorted(records, key=lambda r: r[0]) for split, records in out.items()}


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> str:
  """A markdown table; the first `left` columns are left-aligned, the others right-aligned."""
  align = ["---"] * left + ["---:"] * (len(header) - left)
  lines = [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |"]
  lines += [f"| {' | '.join(r)} |" for r in rows]
  return "\n".join(lines)


def machine() -> str:
  """One line describing where a study ran: CPU, cores, jax version and platform."""
  cpu = platform.processor() or platform.machine()
  return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"


def jsonable(x):
  """`x` with numpy scalars and arrays as Python values, tuples as lists and non-finite floats as None."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def run_cli(run_study: Callable[..., dict], example_config: str,
            table: Callable[[list[tuple[str, ...]]], str]) -> None:
  """The command line of a study module: defines --config (e.g. `example_config`) and --quiet, runs
  `run_study(config, progress=...)` under `superlm_jax.cli.run_main`, then prints the report's headline table
  (formatted by `table`) and where the report is."""
  from absl import flags
  from ml_collections import config_flags

  from superlm_jax.cli import run_main

  config_flag = config_flags.DEFINE_config_file("config", None, f"Study config, e.g. {example_config}.",
                                                lock_config=True)
  quiet_flag = flags.DEFINE_bool("quiet", False, "No progress bars.")
  for holder in (config_flag, quiet_flag):  # --help lists the main module's key flags: these are the study's.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])

  def main(argv) -> None:
    del argv
    config: ml_collections.ConfigDict | None = config_flag.value
    if config is None:
      raise UserError(f"--config is required, e.g. --config={example_config}")
    report = run_study(config, progress=not quiet_flag.value)
    print()
    print(table([tuple(r) for r in report["headline"]]))
    print(f"\nReport: {Path(config.study.out_dir) / 'report.md'} ({report['wall_time_s'] / 60:.1f} min)")

  run_main(main)
