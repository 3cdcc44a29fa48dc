"""Find a trained model's super weights and measure what they do (Yu et al. 2024, arXiv 2411.07191):

  python -m superlm_jax.super_weights --checkpoint=runs/gpt2_tiny [--step=N] [--prune=runs/gpt2_tiny_pruned]

Restores a run directory's checkpoint, searches every MLP down-projection for super activations and the weights
that make them (one forward pass per iteration, on training windows), then measures validation perplexity on the
run's prepared validation data: original, super weight(s) zeroed, the largest other weights zeroed (controls),
super activation restored, and int8 round-to-nearest of the MLP weights with and without the super weight held
out. Writes report.md, report.json and activations.png to --out. `--prune` writes a copy of the run with the
super weight(s) zeroed, restorable by `superlm_jax.sample`; the source run is never modified.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from absl import flags

from superlm_jax.cli import run_main

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory written by superlm_jax.train.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint with the best validation loss.")
_OUT = flags.DEFINE_string("out", None, "Report directory (default: <checkpoint>/super_weights).")
_PRUNE = flags.DEFINE_string("prune", None, "Write the run with the super weight(s) zeroed to this new directory.")
_MAX_ITERS = flags.DEFINE_integer("max_iters", 5, "Most super weights to remove (detection iterations).")
_THRESHOLD = flags.DEFINE_float("threshold", 100.0, "A spike: max |down-proj output| >= threshold x its median.")
_MIN_SHARE = flags.DEFINE_float("min_share", 0.5, "Share of the spike one weight must make to be a super weight.")
_STOP_FRACTION = flags.DEFINE_float("stop_fraction", 0.1, "Later spikes must reach this x the first super "
                                    "activation (the iteration stops when spikes are greatly suppressed).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "Validation batches (default: the run's "
                                     "train.eval_batches).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Windows per batch (default: the run's train.batch_size).")
_DETECT_WINDOWS = flags.DEFINE_integer("detect_windows", None, "Training windows in the detection pass "
                                       "(default: one batch).")
_CONTROL = flags.DEFINE_integer("control_count", 100, "How many of the largest other weights the strong control "
                                "zeroes.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared data directory (train.bin, val.bin, meta.json) in the "
                                 "model's tokenization (default: the run's data.dir/v<vocab>).")
_QUANTIZE = flags.DEFINE_bool("quantize", True, "Also measure int8 round-to-nearest with/without the hold-out.")


def check_prune_dir(run_dir: Path, out_dir: Path) -> None:
  """The pruned copy goes to a new directory: never over or inside the source run, never over another."""
  from superlm_jax.errors import UserError

  if out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents:
    raise UserError(f"--prune={out_dir} is inside the source run {run_dir}; choose a new directory")
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise UserError(f"--prune={out_dir} already exists and is not empty; choose a new directory")


def write_pruned(run_dir: Path, out_dir: Path, model, config, step: int, weights, sites) -> None:
  """A new run directory (config.json, the tokenizer, checkpoints/<step> with params and model state) with
  `weights` zeroed: `superlm_jax.sample` and `train.init_from` read it like any run."""
  from flax import nnx

  from superlm_jax import checkpoint as ckpt_lib
  from superlm_jax.analysis.sites import zero_weights

  check_prune_dir(run_dir, out_dir)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = zero_weights(params, sites, [w.coordinate for w in weights])
  config = config.copy_and_resolve_references()
  config.train.workdir = str(out_dir)
  config.train.init_from = ""
  ckpt_lib.save_tokenizer_and_config(out_dir, run_dir, config)  # whichever tokenizer the run has
  checkpointer = ckpt_lib.Checkpointer(out_dir / "checkpoints", keep=1)
  meta = {"step": step, "pruned_from": str(run_dir.resolve()),
          "zeroed": [{"site": w.site, "row": w.row, "col": w.col, "value": w.value} for w in weights]}
  checkpointer.save(step, {"params": params, "model_state": rest}, meta)
  checkpointer.wait()
  checkpointer.close()


def main(argv):
  del argv
  import jax.numpy as jnp

  from superlm_jax.analysis import super_weights as sw
  from superlm_jax.analysis import super_weights_report as report_lib
  from superlm_jax.analysis.sites import mlp_sites
  from superlm_jax.data import pipeline
  from superlm_jax.data.prepare import resolve_data_dir
  from superlm_jax.data.tokenizer import load_tokenizer
  from superlm_jax.errors import UserError
  from superlm_jax.generate.restore import load_model
  from superlm_jax.models import accounting

  if not _CHECKPOINT.value:
    raise UserError("--checkpoint=RUN_DIR is required (the train.workdir of a training run)")
  for flag in (_MAX_ITERS, _EVAL_BATCHES, _BATCH_SIZE, _DETECT_WINDOWS, _CONTROL):
    if flag.value is not None and flag.value < (0 if flag is _MAX_ITERS else 1):
      raise UserError(f"--{flag.name}={flag.value} must be positive")
  run_dir = Path(_CHECKPOINT.value)
  prune_dir = Path(_PRUNE.value) if _PRUNE.value else None
  # One module per layer: sites and probes are per layer (a scan-layout run is cut up here).
  model, config, step = load_model(run_dir, step=_STEP.value, best=_BEST.value, layout="loop")
  if prune_dir is not None:
    check_prune_dir(run_dir, prune_dir)  # before the slow part
  data_dir = Path(_DATA_DIR.value) if _DATA_DIR.value else resolve_data_dir(config.data, config.model.vocab_size)
  batch_size = _BATCH_SIZE.value or config.train.batch_size
  max_length = config.data.max_length
  batches = pipeline.eval_batches(data_dir, max_length, batch_size, _EVAL_BATCHES.value or config.train.eval_batches)
  tokens = sw.text_windows(data_dir, max_length, _DETECT_WINDOWS.value or batch_size)
  tokenizer = load_tokenizer(run_dir)
  m = config.model
  print(f"Restored {run_dir} at step {step} ({config.name}); searching {len(mlp_sites(model))} MLPs.",
        file=sys.stderr)

  analysis = sw.analyze(model, jnp.asarray(tokens), batches, threshold=_THRESHOLD.value,
                        min_share=_MIN_SHARE.value, max_iters=_MAX_ITERS.value, stop_fraction=_STOP_FRACTION.value,
                        control_count=_CONTROL.value, quantize=_QUANTIZE.value)
  counts = accounting.parameter_count(m)
  ffn = "MoE" if m.n_routed_experts else m.mlp
  description = (f"{config.name}, {counts['total']:,} parameters, {m.num_layers} layers, d_model {m.d_model}, "
                 f"{ffn} feed-forward (d_ff {m.d_ff}), {m.attention} attention; `{run_dir}` step {step}")
  source = {"checkpoint": str(run_dir), "step": step, "name": config.name, "description": description,
            "data_dir": str(data_dir), "parameters": counts["total"]}
  report = report_lib.build_report(analysis, detect_tokens=tokens, eval_batches=batches, source=source,
                                   token_piece=tokenizer.id_to_piece)
  out_dir = Path(_OUT.value) if _OUT.value else run_dir / "super_weights"
  command = "python -m superlm_jax.super_weights " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  path = report_lib.write_report(report, out_dir, command)

  print(report_lib.verdict(report))
  for name, c in report["ablation"]["conditions"].items():
    print(f"  {report_lib.condition_label(name, report):<58} perplexity {c['perplexity']:10.2f}")
  for name, c in (report["quantization"] or {}).items():
    if name != "original":
      print(f"  {name.replace('_', ' '):<58} perplexity {c['perplexity']:10.2f}")
  if prune_dir is not None:
    write_pruned(run_dir, prune_dir, model, config, step, analysis.detection.ablated, analysis.detection.sites)
    what = "super weight(s)" if report["ablated_are_super_weights"] else "strongest candidate (not a super weight)"
    print(f"Pruned run ({len(analysis.detection.ablated)} {what} zeroed): {prune_dir}")
  print(f"Report: {path} ({analysis.wall_time_s:.0f} s)")


def cli() -> None:
  """The `superlm-super-weights` console script (pyproject.toml): the same program as `python -m superlm_jax.super_weights`."""
  run_main(main)


if __name__ == "__main__":
  cli()
