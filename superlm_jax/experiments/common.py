"""What the studies in this package share: the comparison they declare (`Comparison`, `comparison_config`,
`check_comparison`), reading a run's metrics, markdown tables, the machine line, JSON-safe reports, training several
runs with their summed training time, and the command line (`--config`, `--quiet`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np

from superlm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A study's controlled comparison, declared once in `experiments/<study>.py`: the names of its runs (config
  sections, in report order) and, per config section, the only keys in which the runs may differ. The study's config
  (`configs/<study>.py`) builds its sections with `comparison_config`, which ties every other key to the first run's,
  and the study checks any config it is given with `check_comparison`."""
  runs: tuple[str, ...]
  may_differ: tuple[tuple[str, tuple[str, ...]], ...] = (("train", ("workdir",)),)  # (section, keys) pairs

  def keys_that_may_differ(self, section: str) -> tuple[str, ...]:
    return dict(self.may_differ).get(section, ())


def comparison_config(comparison: Comparison, runs: dict[str, ml_collections.ConfigDict],
                      study: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The study config: `study` plus one section per run (`runs`, built in full), with every key the runs may not
  differ in tied to the first run's field, so an override of it changes every run."""
  from superlm_jax.config import tie_shared_keys  # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict()
  c.study = study
  for name in comparison.runs:
    c[name] = runs[name]
  first, *others = comparison.runs
  tie_shared_keys(c[first], [c[name] for name in others], except_keys=dict(comparison.may_differ),
                  sections=("model", "data", "train"))
  return c


def study_config(comparison: Comparison, presets: dict, preset: str | None,
                 study_defaults: Callable[[], ml_collections.ConfigDict],
                 make_run: Callable[[str, dict, str], ml_collections.ConfigDict],
                 adjust_runs: Callable[[dict], None] | None = None) -> ml_collections.ConfigDict:
  """A study's `get_config(preset)`: the `study` section (`study_defaults()` updated with the preset's "study"
  dict), one section per run, `make_run(preset name, preset dict, run name)`, tied by `comparison_config` (after
  `adjust_runs(runs)`, which may set ties of its own), and each run's train.workdir = study.out_dir/<run>."""
  name = preset or "default"
  if name not in presets:
    raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(presets))}")
  overrides = presets[name]
  study = study_defaults()
  study.update(**overrides["study"])
  runs = {run: make_run(name, overrides, run) for run in comparison.runs}
  if adjust_runs is not None:
    adjust_runs(runs)
  c = comparison_config(comparison, runs, study)
  for run in comparison.runs:
    c[run].train.workdir = c.study.get_ref("out_dir") + f"/{run}"
  return c


def check_comparison(config: ml_collections.ConfigDict, comparison: Comparison,
                     runs: list[str] | None = None) -> None:
  """UserError unless the `runs` sections (default: all) of `config` are a controlled comparison: each is a valid
  run config, they differ only in the declared keys, and no two share a train.workdir."""
  from superlm_jax.config import validate  # pylint: disable=import-outside-toplevel
  runs = list(comparison.runs if runs is None else runs)
  for name in runs:
    if name not in config:
      raise UserError(f"the study config needs a `{name}` section")
    validate(config[name])
  ref_name, *others = runs
  ref = config[ref_name]
  for name in others:
    for section in ("model", "data", "train"):
      for key, value in ref[section].items():
        if key not in comparison.keys_that_may_differ(section) and config[name][section][key] != value:
          raise UserError(f"study: {ref_name}.{section}.{key}={value!r} but {name}.{section}.{key}="
                          f"{config[name][section][key]!r}; the comparison needs them equal")
  workdirs = [Path(config[name].train.workdir).resolve() for name in runs]
  if len(set(workdirs)) != len(workdirs):
    raise UserError("study: two runs would share a train.workdir")


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


def finish_step_panels(fig, axes, quantities: tuple[str, ...], title: str, path: Path,
                       legend_size: float | None = None) -> None:
  """Labels each panel of a figure of curves over training steps (y: the panel's quantity in nats/token), adds
  grids and legends, and saves the figure to `path`."""
  for ax, what in zip(axes, quantities):
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} (nats/token)")
    ax.set_title(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


def machine_and_time_line(report: dict, runs: dict[str, dict]) -> str:
  """The report's closing line: where it ran, the runs' training time (summed over the invocations that trained
  them, `train_runs`) and this invocation's wall time."""
  times = [r.get("train_time_s") for r in runs.values()]  # absent from reports written before they were kept
  trained = ("not recorded" if None in times else
             f"{sum(times) / 60:.1f} min (summed over the invocations that trained them)")
  return (f"Machine: {report['machine']}. Training time over the {len(runs)} runs: {trained}; this invocation of "
          f"the study: {report['wall_time_s'] / 60:.1f} min.")


def report_markdown(head: list[str], discussion: list[str], methods: list[str], report: dict,
                    runs: dict[str, dict]) -> str:
  """A study's report.md: the `head` lines (title, setup, tables, figures), then "Discussion" (one bullet per
  item), "How each number was obtained" (`methods`, lines of their own) and the machine/time line."""
  lines = [*head, "## Discussion", "", *[f"- {item}" for item in discussion], "",
           "## How each number was obtained", "", *methods, "", machine_and_time_line(report, runs), ""]
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


def latest_step(workdir: str | Path) -> int | None:
  """A run directory's latest checkpointed step; None for a fresh run."""
  from superlm_jax.checkpoint import Checkpointer
  directory = Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return None
  checkpointer = Checkpointer(directory, keep=1, create=False)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def train_runs(cfgs: dict[str, ml_collections.ConfigDict], out_dir: str | Path, progress: bool = True,
               describe: Callable[[str, ml_collections.ConfigDict], str] | None = None
               ) -> tuple[dict, dict[str, float]]:
  """Trains each named config in turn (resuming interrupted runs; finished ones are only restored) and returns
  ({name: TrainResult}, {name: training seconds}). The time of a run is summed over the invocations that trained
  it and kept in `out_dir`/train_times.json, since a rerun of a finished study only restores, and its own wall time
  says nothing about training. `describe(name, cfg)` adds to the "== training" line."""
  from superlm_jax.training.loop import train
  times_path = Path(out_dir) / "train_times.json"
  train_times = json.loads(times_path.read_text()) if times_path.is_file() else {}
  results = {}
  for name, cfg in cfgs.items():
    extra = f" ({describe(name, cfg)})" if describe else ""
    print(f"== training {name}{extra} in {cfg.train.workdir}", flush=True)
    before = latest_step(cfg.train.workdir)
    if before is None:
      train_times[name] = 0.0  # A fresh run.
    start = time.perf_counter()
    results[name] = train(cfg, progress=progress)
    if before is None or before < cfg.train.steps:
      train_times[name] = train_times.get(name, 0.0) + time.perf_counter() - start
    times_path.write_text(json.dumps(train_times, indent=2) + "\n")
  return results, {name: train_times[name] for name in cfgs}


def with_max_seq_len(model_cfg: ml_collections.ConfigDict, max_seq_len: int) -> ml_collections.ConfigDict:
  """A plain (reference-free) copy of a model config built for `max_seq_len` tokens. With RoPE or no positions the
  parameters do not depend on it (there is no position table), so a trained model's weights load into the copy
  and it can run longer sequences; a learned table would change shape, which is refused."""
  if model_cfg.positions == "learned" and max_seq_len != model_cfg.max_seq_len:
    raise UserError(f"a model with learned positions has exactly {model_cfg.max_seq_len} position rows; it cannot be "
                    f"rebuilt for {max_seq_len} tokens")
  copy = model_cfg.copy_and_resolve_references()
  copy.max_seq_len = max_seq_len
  return copy


def run_cli(run_study: Callable[..., dict], example_config: str,
            table: Callable[[list[tuple[str, ...]]], str]) -> None:
  """The command line of a study module: defines --config (e.g. `example_config`) and --quiet, runs
  `run_study(config, progress=...)` under `superlm_jax.cli.run_main`, then prints the report's headline table
  (formatted by `table`, or with the column names in the report's `headline_header` when it has one) and where the
  report is."""
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
    rows = [tuple(r) for r in report["headline"]]
    # A study whose columns depend on its config stores their names in the report.
    print(markdown_table(tuple(report["headline_header"]), rows) if "headline_header" in report else table(rows))
    print(f"\nReport: {Path(config.study.out_dir) / 'report.md'} ({report['wall_time_s'] / 60:.1f} min)")

  run_main(main)


def report_cli(write_report: Callable[[dict, Path], None], study: str) -> None:
  """The command line of a `<study>_report` module: `--report=PATH` (a report.json the study wrote) redraws
  report.md and the figures next to it, or in `--out_dir`, without retraining or measuring anything."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  from superlm_jax.cli import run_main  # pylint: disable=import-outside-toplevel

  report_flag = flags.DEFINE_string("report", None, f"A report.json written by superlm_jax.experiments.{study}.")
  out_flag = flags.DEFINE_string("out_dir", None, "Where to write report.md and the figures (default: next to "
                                 "--report).")

  def run(argv) -> None:
    del argv
    if report_flag.value is None:
      raise UserError(f"--report is required, e.g. --report=runs/{study}/report.json")
    path = Path(report_flag.value)
    if not path.is_file():
      raise UserError(f"--report={path}: no such file")
    out_dir = Path(out_flag.value or path.parent)
    write_report(json.loads(path.read_text()), out_dir)
    print(f"Report: {out_dir / 'report.md'}")

  run_main(run)


def save_report(report: dict, out_dir: str | Path, headline_rows: Callable[[dict], list], write_markdown: Callable
                ) -> dict:
  """Adds the headline table rows, makes the report JSON-able, and writes report.md (`write_markdown`) and
  report.json into `out_dir`. Returns the JSON-able report (what run_study returns)."""
  report = jsonable(report)
  report["headline"] = [list(r) for r in headline_rows(report)]
  write_markdown(report, out_dir)
  (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  return report
