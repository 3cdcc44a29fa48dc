"""MoE load balancing (reference project 002 and 003): one Mixture-of-Experts decoder trained three times, with no balancing,
with an auxiliary loss, and with DeepSeek-V3's auxiliary-loss-free bias, then compared on balance and quality.

  python -m superlm_jax.experiments.moe_balance --config=configs/moe_balance.py:tiny

This module trains and measures, and writes report.json; `moe_balance_report` turns report.json alone into report.md
and the figures (and can redraw them: `python -m superlm_jax.experiments.moe_balance_report --report=PATH`).

The question is the one Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
arXiv 2408.15664) answer for models of up to 3B parameters trained on up to 200B tokens: an auxiliary loss buys
balance with gradients that interfere with the language-modelling objective, while a selection-only bias moved by
the observed load (b_i += gamma * sign(mean load - load_i), DeepSeek-V3 sec. 2.1.2) balances without any gradient.
They report MaxVio 0.72 (auxiliary loss) against 0.04 (loss-free) at equal or better perplexity. Seed 002 balanced
with the Switch loss + router z-loss (Fedus et al. 2021; Zoph et al. 2022), reference project 003 with the bias; this study runs
both, and the unbalanced router as the reference, on one small model and reports what actually happens at this
scale.

What is measured, and how (the report says the same):
  MaxVio          (max_i load_i - mean load) / mean load (Wang et al. 2024, eq. 6), per MoE layer, where load_i
                  is expert i's share of the T*k routing assignments; 0 is perfect balance, 1 means the busiest
                  expert does twice its share. Two versions:
                    train   the training loop's per-batch figure from metrics.jsonl (Wang et al.'s MaxVio_batch),
                            averaged over the layers and over the last `study.maxvio_last` logged steps;
                    global  the final model's load summed over all fixed validation batches, then MaxVio
                            (Wang et al.'s MaxVio_global, the figure behind 0.72 -> 0.04).
                  Each comes with its sampling floor: the MaxVio a router whose every token picks k distinct
                  experts uniformly at random would still show at that token count (simulated). Real batches
                  hold correlated tokens, so the floor is a lower bound, not a target.
  expert load     per layer and expert, in multiples of the uniform share 1/E; min and max over all layers.
  loss            validation loss from each run's metrics.jsonl (curves) and the final model (table); the
                  paired per-batch difference against the auxiliary-loss run on the same validation batches, with
                  its standard error. The training curve plots the cross-entropy (log perplexity), which excludes
                  the auxiliary terms the aux-loss run adds to its optimised loss.
  routing bias    each run's final `balance_bias` per layer and expert (zero unless gamma > 0).
"""

from __future__ import annotations

import functools
import math
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from superlm_jax.data import pipeline
from superlm_jax.data.prepare import prepare
from superlm_jax.errors import UserError
from superlm_jax.experiments.common import (Comparison, check_comparison, machine, markdown_table, read_metrics,
                                            run_cli, save_report, train_runs)
from superlm_jax.experiments.moe_balance_report import FIGURES, HEADER, headline_rows, write_report
from superlm_jax.layers.router import max_violation
from superlm_jax.models.spec import ModelSpec, parse_dtype
from superlm_jax.models.transformer import abstract_model, forward_with_moe_stats
from superlm_jax.training.evaluate import Average
from superlm_jax.training.loss import head_token_nll
from superlm_jax.training.step import split_model

SCHEMES = ("no_balancing", "aux_loss", "aux_free")
# The balancing coefficients (train.moe_*): alpha (Switch loss), beta (router z-loss), gamma (bias update rate).
COEFFICIENTS = ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate")
# The controlled comparison: the three runs share everything but their balancing coefficients (and run directories).
COMPARISON = Comparison(runs=SCHEMES, may_differ=(("train", (*COEFFICIENTS, "workdir")),))


# ---------------------------------------------------------------------------------------------- config checks
def check_study_config(config: ml_collections.ConfigDict) -> None:
  """UserError unless the three runs are a controlled comparison of balancing schemes (`COMPARISON`: the same MoE
  model, data and training, only the balancing coefficients and run directories differ) and each run uses its
  scheme."""
  check_comparison(config, COMPARISON)
  if not config[SCHEMES[0]].model.n_routed_experts:
    raise UserError("study: the model has no routed experts (model.n_routed_experts=0)")
  alpha, beta, gamma = ({name: config[name].train[k] for name in SCHEMES} for k in COEFFICIENTS)
  if alpha["no_balancing"] or beta["no_balancing"] or gamma["no_balancing"]:
    raise UserError("study: no_balancing needs train.moe_aux_loss_coef = moe_z_loss_coef = moe_bias_update_rate = 0")
  if alpha["aux_loss"] <= 0 or gamma["aux_loss"]:
    raise UserError("study: aux_loss needs train.moe_aux_loss_coef > 0 and train.moe_bias_update_rate = 0")
  if gamma["aux_free"] <= 0 or alpha["aux_free"] or beta["aux_free"]:
    raise UserError("study: aux_free needs train.moe_bias_update_rate > 0 and no auxiliary loss "
                    "(moe_aux_loss_coef = moe_z_loss_coef = 0)")
  if config.study.maxvio_last < 1:
    raise UserError("study.maxvio_last must be at least 1")


# ---------------------------------------------------------------------------------------------- measurements
def max_violation_per_layer(load) -> np.ndarray:
  """MaxVio (`layers.router.max_violation`, Wang et al. 2024 eq. 6) of each row of `load` [..., experts], in float64
  numpy: the offline figures are computed from logged or summed loads, not on device."""
  return np.asarray(max_violation(np.asarray(load, np.float64)))  # over the last axis, in numpy


def routing_biases(model_state) -> np.ndarray:
  """[moe_layers, experts] aux-loss-free biases from a train state's `model_state`: an nnx.State (TrainResult) or
  the nested dicts `Checkpointer.restore()` returns without an abstract state. Layers in block order."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(model_state)[0]:
    key = jax.tree_util.keystr(path)
    if "balance_bias" in key:
      layer = [int(i) for i in re.findall(r"\['?(\d+)'?\]", key)]
      found.append((layer, np.asarray(leaf, np.float64)))
  if not found:
    raise ValueError("model_state holds no MoE routing biases (balance_bias)")
  return np.stack([bias for _, bias in sorted(found, key=lambda item: item[0])])


def sampling_floor(tokens: int, num_experts: int, k: int, draws: int = 64, seed: int = 0) -> float:
  """Mean MaxVio of a router whose every token picks k distinct experts uniformly at random, over `tokens` tokens:
  what sampling alone costs at that count, for a router whose expected load is perfectly uniform."""
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(draws):
    picks = np.argsort(rng.random((tokens, num_experts)), axis=-1)[:, :k]
    values.append(float(max_violation_per_layer(np.bincount(picks.reshape(-1), minlength=num_experts))))
  return float(np.mean(values))


def validation_stats(cfg: ml_collections.ConfigDict, state: dict, batches: list[dict]) -> dict[str, Any]:
  """The final model on the fixed validation batches: the per-token NLL (nats/token) as every evaluator scores it
  (`training/evaluate.py`: `head_token_nll`, then an `Average` over all target tokens), its per-batch means (the
  units of the paired comparison between runs), and the expert load summed over all batches, [moe_layers, experts]
  (Wang et al.'s MaxVio_global is computed from the latter). `pipeline.eval_batches` gives batches of one shape,
  so one compiled program serves them all and no row is padding."""
  compute_dtype = parse_dtype(cfg.train.compute_dtype)
  graphdef = split_model(abstract_model(ModelSpec.from_config(cfg.model, compute_dtype)))[0]

  @jax.jit
  def run(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    hidden, stats = forward_with_moe_stats(model, batch["inputs"], batch.get("positions"), batch.get("segments"))
    return head_token_nll(hidden, model.output_head(), batch["targets"]), jnp.stack([s["load"] for s in stats])

  loss, per_batch, counts, tokens = Average(), [], 0.0, 0
  for batch in batches:
    nll, load = run(state["params"], state["model_state"], {k: jnp.asarray(v) for k, v in batch.items()})
    nll = np.asarray(nll, np.float64)
    loss.add(nll)
    per_batch.append(nll.mean())
    size = batch["inputs"].size
    counts = counts + np.asarray(load, np.float64) * size  # load is a share of this batch's assignments
    tokens += size
  return {"loss": loss, "per_batch_nll": np.array(per_batch), "load": counts / tokens, "tokens": tokens}


def _train_curves(records: list[tuple[int, dict]]) -> dict[str, list]:
  """Per logged training step: cross-entropy (log perplexity: the optimised loss minus the balancing terms), MaxVio
  (mean over layers, and per layer), the Switch loss value (whether or not it was optimised), router entropy."""
  rows = [(s, r) for s, r in records if r.get("moe_load") is not None]
  return {
      "step": [s for s, _ in rows],
      "nll": [math.log(r["perplexity"]) if r.get("perplexity") else None for _, r in rows],
      "maxvio": [r["moe_max_violation"] for _, r in rows],
      "maxvio_layers": [max_violation_per_layer(r["moe_load"]).tolist() for _, r in rows],
      "aux_loss": [r.get("moe_aux_loss") for _, r in rows],
      "z_loss": [r.get("moe_z_loss") for _, r in rows],
      "entropy": [r.get("moe_entropy") for _, r in rows],
      "dropped": [r.get("moe_dropped") for _, r in rows],
      "load": [r["moe_load"] for _, r in rows],
  }


def summarise_run(cfg: ml_collections.ConfigDict, result, metrics: dict, val: dict, last: int,
                  reference_nll: np.ndarray | None) -> dict[str, Any]:
  """One run's row of the report."""
  curves = _train_curves(metrics.get("train", []))
  if not curves["step"]:
    raise RuntimeError(f"{cfg.train.workdir}/metrics.jsonl has no MoE training records")
  tail = slice(-min(last, len(curves["step"])), None)
  experts = cfg.model.n_routed_experts
  train_load = np.mean(np.array(curves["load"][tail], np.float64), axis=0)  # [layers, experts]
  biases = routing_biases(result.state["model_state"])
  row = {
      "coefficients": {"alpha": cfg.train.moe_aux_loss_coef, "beta": cfg.train.moe_z_loss_coef,
                       "gamma": cfg.train.moe_bias_update_rate},
      "steps_trained": int(result.state["step"]),
      "last_logged_step": max(step for split in metrics.values() for step, _ in split),
      "final_val_loss": float(result.val_loss),
      "val_loss_batches": val["loss"].to_json(),
      "val_curve": [(step, r["loss"]) for step, r in metrics.get("val", [])],
      "maxvio_train": float(np.mean(curves["maxvio"][tail])),
      "maxvio_train_layers": np.mean(np.array(curves["maxvio_layers"][tail]), axis=0).tolist(),
      "maxvio_train_peak": float(max(curves["maxvio"])),
      "maxvio_train_peak_step": curves["step"][int(np.argmax(curves["maxvio"]))],
      "maxvio_global": float(max_violation_per_layer(val["load"]).mean()),
      "maxvio_global_layers": max_violation_per_layer(val["load"]).tolist(),
      "load_train": (train_load * experts).tolist(),  # multiples of the uniform share
      "load_val": (val["load"] * experts).tolist(),
      "load_train_min": float(train_load.min() * experts), "load_train_max": float(train_load.max() * experts),
      "load_val_min": float(val["load"].min() * experts), "load_val_max": float(val["load"].max() * experts),
      "switch_loss_final": float(np.mean(curves["aux_loss"][tail])),
      "z_loss_final": float(np.mean(curves["z_loss"][tail])),
      "entropy_final": float(np.mean(curves["entropy"][tail])),
      "dropped_final": float(np.mean(curves["dropped"][tail])),
      "bias": biases.tolist(),
      "bias_abs_max": float(np.abs(biases).max()),
      "bias_spread": float((biases.max(-1) - biases.min(-1)).mean()),
      "curves": curves,
      "workdir": str(cfg.train.workdir),
  }
  if reference_nll is not None:
    # Paired over the same batches; the batch, not the token, is the unit: a batch's tokens are not independent.
    row["val_diff_vs_aux_loss"] = Average().add(val["per_batch_nll"] - reference_nll).to_json()
  return row


# ---------------------------------------------------------------------------------------------- the study
def run_study(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """Trains the three runs (resuming if rerun), measures them, and writes report.json and, from it alone
  (`moe_balance_report.write_report`), report.md, maxvio.png, loss_curves.png and expert_load.png into
  `config.study.out_dir` (plus train_times.json, each run's training time summed over the invocations that trained
  it). Returns the report dict (what report.json holds)."""
  started = time.perf_counter()
  check_study_config(config)
  s = config.study
  out_dir = Path(s.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cfgs = {name: config[name] for name in SCHEMES}
  ref = cfgs[SCHEMES[0]]

  results, train_times = train_runs(
      cfgs, out_dir, progress, describe=lambda name, cfg: (
          f"alpha={cfg.train.moe_aux_loss_coef:g}, beta={cfg.train.moe_z_loss_coef:g}, "
          f"gamma={cfg.train.moe_bias_update_rate:g}"))

  data_dir = prepare(ref.data, ref.model.vocab_size)
  batches = pipeline.eval_batches(data_dir, ref.data.max_length, ref.train.batch_size, ref.train.eval_batches)
  val = {name: validation_stats(cfg, results[name].state, batches) for name, cfg in cfgs.items()}
  metrics = {name: read_metrics(cfg.train.workdir) for name, cfg in cfgs.items()}
  runs = {}
  for name, cfg in cfgs.items():
    reference = None if name == "aux_loss" else val["aux_loss"]["per_batch_nll"]
    runs[name] = summarise_run(cfg, results[name], metrics[name], val[name], s.maxvio_last, reference)
    runs[name]["train_time_s"] = train_times[name]

  m = ModelSpec.from_config(ref.model)
  k = m.num_experts_per_tok
  tokens_per_batch = ref.train.batch_size * ref.train.grad_accum_steps * ref.data.max_length
  val_tokens = val[SCHEMES[0]]["tokens"]
  floors = {"train": sampling_floor(tokens_per_batch, m.n_routed_experts, k),
            "val": sampling_floor(val_tokens, m.n_routed_experts, k)}
  report = {
      "name": ref.name.replace(f"moe_balance/{SCHEMES[0]}", "moe_balance"),
      "machine": machine(),
      "steps": ref.train.steps,
      "train_shape": f"{ref.train.batch_size * ref.train.grad_accum_steps} x {ref.data.max_length}",
      "train_tokens_per_batch": tokens_per_batch,
      "val_tokens": val_tokens,
      "unigram_val_loss": results[SCHEMES[0]].unigram_loss,
      "config": {
          "d_model": m.d_model, "num_layers": m.num_layers, "num_heads": m.num_heads,
          "num_kv_heads": m.num_kv_heads, "n_routed_experts": m.n_routed_experts,
          "n_shared_experts": m.n_shared_experts, "num_experts_per_tok": k,
          "expert_width": m.expert_hidden, "router_scoring": m.router_scoring,
          "moe_dispatch": m.moe_dispatch, "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len,
          "seed": ref.train.seed, "data_seed": ref.data.seed, "batch_size": ref.train.batch_size,
          "learning_rate": ref.train.learning_rate,
      },
      "study": s.to_dict(),
      "sampling_floor": floors,
      "runs": runs,
      "files": ["report.md", "report.json", *FIGURES],
  }
  report["wall_time_s"] = time.perf_counter() - started
  return save_report(report, out_dir, headline_rows, write_report)


if __name__ == "__main__":
  run_cli(run_study, "configs/moe_balance.py:tiny", functools.partial(markdown_table, HEADER, left=2))
