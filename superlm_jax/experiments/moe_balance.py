"""MoE load balancing (seeds 002 and 003): one Mixture-of-Experts decoder trained three times, with no balancing,
with an auxiliary loss, and with DeepSeek-V3's auxiliary-loss-free bias, then compared on balance and quality.

  python -m superlm_jax.experiments.moe_balance --config=configs/moe_balance.py:tiny

The question is the one Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
arXiv 2408.15664) answer for models of up to 3B parameters trained on up to 200B tokens: an auxiliary loss buys
balance with gradients that interfere with the language-modelling objective, while a selection-only bias moved by
the observed load (b_i += gamma * sign(mean load - load_i), DeepSeek-V3 sec. 2.1.2) balances without any gradient.
They report MaxVio 0.72 (auxiliary loss) against 0.04 (loss-free) at equal or better perplexity. Seed 002 balanced
with the Switch loss + router z-loss (Fedus et al. 2021; Zoph et al. 2022), seed 003 with the bias; this study runs
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

from superlm_jax.config import validate
from superlm_jax.data import pipeline
from superlm_jax.data.prepare import prepare
from superlm_jax.errors import UserError
from superlm_jax.experiments.common import machine, read_metrics, run_cli, save_report, train_runs
from superlm_jax.experiments.common import markdown_table as _markdown_table
from superlm_jax.models.transformer import build_model, forward_with_moe_stats
from superlm_jax.training.loss import head_cross_entropy

SCHEMES = ("no_balancing", "aux_loss", "aux_free")
LABELS = {"no_balancing": "no balancing", "aux_loss": "aux loss (Switch + z)", "aux_free": "aux-loss-free (bias)"}
COLORS = {"no_balancing": "tab:gray", "aux_loss": "tab:blue", "aux_free": "tab:red"}
# Train keys the runs may differ in (configs/moe_balance.py ties everything else together).
_PER_RUN_TRAIN_KEYS = ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate", "workdir")
_COEFS = ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate")


# ---------------------------------------------------------------------------------------------- config checks
def check_study_config(config: ml_collections.ConfigDict) -> None:
  """UserError unless the three runs are a controlled comparison of balancing schemes: the same MoE model, data and
  training, only the balancing coefficients (and run directories) differ, and each run uses its scheme."""
  for name in SCHEMES:
    if name not in config:
      raise UserError(f"the study config needs a `{name}` section (see configs/moe_balance.py)")
    validate(config[name])
  ref = config[SCHEMES[0]]
  if not ref.model.n_routed_experts:
    raise UserError("study: the model has no routed experts (model.n_routed_experts=0)")
  for name in SCHEMES[1:]:
    for section in ("model", "data", "train"):
      for key, value in ref[section].items():
        if section == "train" and key in _PER_RUN_TRAIN_KEYS:
          continue
        if config[name][section][key] != value:
          raise UserError(f"study: {SCHEMES[0]}.{section}.{key}={value!r} but {name}.{section}.{key}="
                          f"{config[name][section][key]!r}; the comparison needs them equal")
  alpha, beta, gamma = ({name: config[name].train[k] for name in SCHEMES} for k in _COEFS)
  if alpha["no_balancing"] or beta["no_balancing"] or gamma["no_balancing"]:
    raise UserError("study: no_balancing needs train.moe_aux_loss_coef = moe_z_loss_coef = moe_bias_update_rate = 0")
  if alpha["aux_loss"] <= 0 or gamma["aux_loss"]:
    raise UserError("study: aux_loss needs train.moe_aux_loss_coef > 0 and train.moe_bias_update_rate = 0")
  if gamma["aux_free"] <= 0 or alpha["aux_free"] or beta["aux_free"]:
    raise UserError("study: aux_free needs train.moe_bias_update_rate > 0 and no auxiliary loss "
                    "(moe_aux_loss_coef = moe_z_loss_coef = 0)")
  workdirs = {Path(config[name].train.workdir).resolve() for name in SCHEMES}
  if len(workdirs) != len(SCHEMES):
    raise UserError("study: two runs would share a train.workdir")
  if config.study.maxvio_last < 1:
    raise UserError("study.maxvio_last must be at least 1")


# ---------------------------------------------------------------------------------------------- measurements
def max_violation(load: np.ndarray) -> np.ndarray:
  """MaxVio over the last axis (Wang et al. 2024, eq. 6): (max - mean) / mean."""
  load = np.asarray(load, np.float64)
  mean = load.mean(-1)
  return (load.max(-1) - mean) / mean


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
    values.append(float(max_violation(np.bincount(picks.reshape(-1), minlength=num_experts))))
  return float(np.mean(values))


def validation_stats(cfg: ml_collections.ConfigDict, state: dict, batches: list[dict]) -> dict[str, Any]:
  """The final model on the fixed validation batches: per-batch NLL (nats/token) and the expert load summed over
  all batches, [moe_layers, experts] (Wang et al.'s MaxVio_global is computed from the latter)."""
  compute_dtype = jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32
  graphdef = nnx.split(build_model(cfg.model, compute_dtype=compute_dtype), nnx.Param, ...)[0]

  @jax.jit
  def run(params, model_state, batch):
    model = nnx.merge(graphdef, params, model_state)
    hidden, stats = forward_with_moe_stats(model, batch["inputs"])
    _, nll = head_cross_entropy(hidden, model.output_head(), batch["targets"])
    return nll, jnp.stack([s["load"] for s in stats])

  nlls, counts, tokens = [], 0.0, 0
  for batch in batches:
    nll, load = run(state["params"], state["model_state"], {k: jnp.asarray(v) for k, v in batch.items()})
    size = batch["inputs"].size
    nlls.append(float(nll))
    counts = counts + np.asarray(load, np.float64) * size  # load is a share of this batch's assignments
    tokens += size
  load = counts / tokens
  return {"per_batch_nll": np.array(nlls), "load": load, "tokens": tokens}


def _train_curves(records: list[tuple[int, dict]]) -> dict[str, list]:
  """Per logged training step: cross-entropy (log perplexity: the optimised loss minus the balancing terms), MaxVio
  (mean over layers, and per layer), the Switch loss value (whether or not it was optimised), router entropy."""
  rows = [(s, r) for s, r in records if r.get("moe_load") is not None]
  return {
      "step": [s for s, _ in rows],
      "nll": [math.log(r["perplexity"]) if r.get("perplexity") else None for _, r in rows],
      "maxvio": [r["moe_max_violation"] for _, r in rows],
      "maxvio_layers": [max_violation(np.array(r["moe_load"])).tolist() for _, r in rows],
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
      "val_loss_batches": float(val["per_batch_nll"].mean()),
      "val_curve": [(step, r["loss"]) for step, r in metrics.get("val", [])],
      "maxvio_train": float(np.mean(curves["maxvio"][tail])),
      "maxvio_train_layers": np.mean(np.array(curves["maxvio_layers"][tail]), axis=0).tolist(),
      "maxvio_train_peak": float(max(curves["maxvio"])),
      "maxvio_train_peak_step": curves["step"][int(np.argmax(curves["maxvio"]))],
      "maxvio_global": float(max_violation(val["load"]).mean()),
      "maxvio_global_layers": max_violation(val["load"]).tolist(),
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
    diff = val["per_batch_nll"] - reference_nll
    row["val_diff_vs_aux_loss"] = {
        "mean": float(diff.mean()), "batches": int(diff.size),
        "standard_error": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan")}
  return row


def stays_below(curves: dict, other: dict) -> int | None:
  """The first logged step from which `curves`' MaxVio stays below `other`'s (same logged steps) to the end."""
  theirs = dict(zip(other["step"], other["maxvio"]))
  pairs = [(step, v, theirs[step]) for step, v in zip(curves["step"], curves["maxvio"]) if step in theirs]
  first = None
  for step, mine, other_value in pairs:
    if mine < other_value:
      first = step if first is None else first
    else:
      first = None
  return first


# ---------------------------------------------------------------------------------------------- figures
def plot_losses(runs: dict[str, dict], path: Path, title: str) -> None:
  from matplotlib.figure import Figure  # No pyplot: no global state, no display needed.
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, 2)
  for name, run in runs.items():
    c = run["curves"]
    points = [(s, v) for s, v in zip(c["step"], c["nll"]) if v is not None]
    if points:
      axes[0].plot(*zip(*points), color=COLORS[name], label=LABELS[name], linewidth=1.2)
    if run["val_curve"]:
      axes[1].plot(*zip(*run["val_curve"]), color=COLORS[name], label=LABELS[name], marker="o")
  for ax, what in zip(axes, ("training cross-entropy", "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} (nats/token)")
    ax.set_title(what)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


def plot_maxvio(runs: dict[str, dict], floors: dict[str, float], path: Path, title: str) -> None:
  """MaxVio of the training batches vs step: mean over layers (thick), each layer (thin), and the sampling floor."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(8, 4.6), layout="constrained")
  ax = fig.subplots()
  for name, run in runs.items():
    c = run["curves"]
    ax.plot(c["step"], c["maxvio"], color=COLORS[name], label=LABELS[name], linewidth=1.8)
    for layer in np.array(c["maxvio_layers"]).T:
      ax.plot(c["step"], layer, color=COLORS[name], linewidth=0.6, alpha=0.3)
  ax.axhline(floors["train"], color="black", linestyle="--", linewidth=1,
             label=f"sampling floor ({floors['train']:.3f})")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("MaxVio of the training batch (log scale)")
  ax.set_title("MaxVio = (max load - mean) / mean; thick: mean over layers, thin: each layer")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


def plot_load(runs: dict[str, dict], path: Path, title: str) -> None:
  """The final models' validation load per layer and expert, in multiples of the uniform share."""
  from matplotlib.colors import TwoSlopeNorm
  from matplotlib.figure import Figure
  names = list(runs)
  fig = Figure(figsize=(4.2 * len(names), 3.4), layout="constrained")
  axes = fig.subplots(1, len(names))
  top = max(max(max(row) for row in run["load_val"]) for run in runs.values())
  image = None
  for ax, name in zip(axes, names):
    load = np.array(runs[name]["load_val"])
    # White at the uniform share, blue below it, red above it.
    image = ax.imshow(load, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, top)),
                      aspect="auto")
    for (i, j), v in np.ndenumerate(load):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"{LABELS[name]}\nMaxVio_global {runs[name]['maxvio_global']:.3f}", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(load.shape[1]))
    ax.set_yticks(range(load.shape[0]))
  fig.colorbar(image, ax=axes, label="load / uniform share")
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- report
def headline_rows(report: dict) -> list[tuple[str, ...]]:
  rows = []
  for name in SCHEMES:
    r = report["runs"][name]
    c = r["coefficients"]
    if name == "aux_loss":
      diff = "(reference)"
    else:
      d = r["val_diff_vs_aux_loss"]
      diff = f"{d['mean']:+.4f} ± {d['standard_error']:.4f}"
    rows.append((LABELS[name], f"{c['alpha']:g} / {c['beta']:g} / {c['gamma']:g}", f"{r['final_val_loss']:.4f}",
                 diff, f"{r['maxvio_train']:.3f}", f"{r['maxvio_global']:.3f}",
                 f"{r['load_train_min']:.2f} / {r['load_train_max']:.2f}", f"{r['bias_abs_max']:.4f}",
                 f"{r['train_time_s'] / 60:.1f} min"))
  return rows


HEADER = ("scheme", "α / β / γ", "final val loss", "Δ val loss vs aux loss (± s.e.)", "MaxVio train (last logs)",
          "MaxVio global (val)", "min / max expert load (× uniform)", "max abs bias", "train time")


def markdown_table(rows: list[tuple[str, ...]]) -> str:
  return _markdown_table(HEADER, rows, left=2)


def discussion(report: dict) -> list[str]:
  """Conclusions drawn from the numbers (not written in advance)."""
  runs, floors = report["runs"], report["sampling_floor"]
  none, aux, free = runs["no_balancing"], runs["aux_loss"], runs["aux_free"]
  out = []

  # Balance.
  ratio = aux["maxvio_global"] / max(free["maxvio_global"], 1e-12)
  if free["maxvio_global"] < aux["maxvio_global"] / 3:
    verdict = (f"aux-loss-free balances **{ratio:.1f}x better** than the auxiliary loss on the validation set, "
               "the direction and rough size of Wang et al.'s 0.72 -> 0.04")
  elif free["maxvio_global"] < aux["maxvio_global"]:
    verdict = (f"aux-loss-free balances better than the auxiliary loss ({ratio:.1f}x lower global MaxVio), but by "
               "far less than Wang et al.'s 0.72 -> 0.04 (18x)")
  else:
    verdict = ("aux-loss-free does **not** balance better than the auxiliary loss here "
               f"(global MaxVio {free['maxvio_global']:.3f} vs {aux['maxvio_global']:.3f}), unlike in Wang et al.'s "
               "runs")
  out.append(
      f"**Balance.** Global MaxVio on {report['val_tokens']:,} validation tokens: {none['maxvio_global']:.3f} with no "
      f"balancing, {aux['maxvio_global']:.3f} with the auxiliary loss, {free['maxvio_global']:.3f} aux-loss-free: "
      f"{verdict}. On training batches (mean of the last {report['study']['maxvio_last']} logged steps) the same "
      f"order reads {none['maxvio_train']:.3f} / {aux['maxvio_train']:.3f} / {free['maxvio_train']:.3f}. A router "
      f"with perfectly uniform expected load would still show about {floors['train']:.3f} per training batch of "
      f"{report['train_tokens_per_batch']:,} tokens and {floors['val']:.3f} over the validation tokens, from "
      "sampling alone; MaxVio near those floors is as balanced as this measurement can tell.")

  # Dynamics.
  gamma = free["coefficients"]["gamma"]
  crossing = stays_below(free["curves"], aux["curves"])
  crossing_text = (f"From step {crossing} on, aux-loss-free's batch MaxVio stays below the auxiliary loss's. "
                   if crossing is not None else
                   "Aux-loss-free's batch MaxVio does not stay below the auxiliary loss's by the end of the run. ")
  out.append(
      f"**Dynamics.** Peak training-batch MaxVio: {none['maxvio_train_peak']:.2f} (step "
      f"{none['maxvio_train_peak_step']}) with no balancing, {aux['maxvio_train_peak']:.2f} (step "
      f"{aux['maxvio_train_peak_step']}) with the auxiliary loss, {free['maxvio_train_peak']:.2f} (step "
      f"{free['maxvio_train_peak_step']}) aux-loss-free. {crossing_text}The bias moves at most gamma = {gamma:g} per "
      "step, so it lags an imbalance that forms faster than that. Its final biases reach |b| = "
      f"{free['bias_abs_max']:.4f}, where {report['steps']} steps allow at most {gamma * report['steps']:.3f}; a "
      "layer's largest and smallest "
      f"bias are {free['bias_spread']:.4f} apart on average, against softmax scores of 1/"
      f"{report['config']['n_routed_experts']} = {1 / report['config']['n_routed_experts']:.3f} per expert at "
      "uniform routing. The other two runs' biases stay "
      f"{max(none['bias_abs_max'], aux['bias_abs_max']):g}.")

  # Quality.
  def verdict_of(d):
    within = abs(d["mean"]) <= 2 * d["standard_error"]
    return ("within two standard errors of the auxiliary-loss run" if within else
            f"{'worse' if d['mean'] > 0 else 'better'} than the auxiliary-loss run by more than two standard errors")
  d_free, d_none = free["val_diff_vs_aux_loss"], none["val_diff_vs_aux_loss"]
  best = min(SCHEMES, key=lambda name: runs[name]["final_val_loss"])
  if best == "no_balancing":
    cost = ("The unbalanced router has the lowest loss: here balance is a constraint that costs quality, and "
            f"aux-loss-free pays {'less' if free['final_val_loss'] < aux['final_val_loss'] else 'more'} for it than "
            "the auxiliary loss. Nothing in this setting rewards balance: dispatch is dropless and the experts are not "
            "spread over devices, so an overloaded expert neither drops tokens nor holds up the others; balance pays "
            "off with expert parallelism or capacity limits, which this study does not model. ")
  else:
    cost = ""
  out.append(
      f"**Quality.** Final validation loss: {none['final_val_loss']:.4f} (no balancing), {aux['final_val_loss']:.4f} "
      f"(auxiliary loss), {free['final_val_loss']:.4f} (aux-loss-free) nats/token. Paired over the same "
      f"{d_free['batches']} validation batches, aux-loss-free - aux loss = {d_free['mean']:+.4f} ± "
      f"{d_free['standard_error']:.4f} ({verdict_of(d_free)}); no balancing - aux loss = {d_none['mean']:+.4f} ± "
      f"{d_none['standard_error']:.4f} ({verdict_of(d_none)}). Wang et al. expect aux-loss-free to be at least as "
      f"good as the auxiliary loss. {cost}The standard error covers the choice of validation text only: each scheme "
      "was trained once, with one seed, so seed-to-seed variation (often a few hundredths of a nat at this size) is "
      "not measured.")

  out.append(
      f"**Router.** Final Switch-loss value E * sum f_i P_i (1 at perfect balance, computed in every run, optimised "
      f"only in the aux-loss run): {none['switch_loss_final']:.3f} / {aux['switch_loss_final']:.3f} / "
      f"{free['switch_loss_final']:.3f}; router entropy {none['entropy_final']:.3f} / {aux['entropy_final']:.3f} / "
      f"{free['entropy_final']:.3f} nats (uniform over {report['config']['n_routed_experts']} experts: "
      f"{math.log(report['config']['n_routed_experts']):.3f}). Dispatch is dropless: the dropped fraction is "
      f"{max(r['dropped_final'] for r in runs.values()):g} in every run.")

  out.append(
      f"**Scale.** This is {report['steps']} steps of {report['train_tokens_per_batch']:,} tokens on a "
      f"{report['config']['d_model']}-wide, {report['config']['num_layers']}-layer model with "
      f"{report['config']['n_routed_experts']} experts (top-{report['config']['num_experts_per_tok']}), against "
      "Wang et al.'s 1B-3B models trained on 100B-200B tokens with many more, finer experts. The balance figures "
      "transfer in kind; small loss differences at this size say little about the interference-gradient argument, "
      "which concerns long training.")
  return out


def write_report(report: dict, out_dir: Path) -> None:
  cfg, s = report["config"], report["study"]
  lines = [
      f"# MoE load balancing: {report['name']}", "",
      f"One decoder (d_model {cfg['d_model']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads / "
      f"{cfg['num_kv_heads']} KV heads, RoPE, {cfg['n_routed_experts']} routed SwiGLU experts of width "
      f"{cfg['expert_width']}, top-{cfg['num_experts_per_tok']}, {cfg['router_scoring']} router, "
      f"{cfg['moe_dispatch']} dispatch, vocab {cfg['vocab_size']}) trained three times for {report['steps']} steps "
      f"of {report['train_shape']} tokens on the same data in the same order (data seed {cfg['data_seed']}, train "
      f"seed {cfg['seed']}); only the balancing differs:", "",
      "- **no balancing**: cross-entropy only.",
      "- **aux loss**: + α · E · Σ_i f_i P_i (Switch Transformer, Fedus et al. 2021, eq. 4) "
      "+ β · mean(logsumexp²) "
      "(ST-MoE router z-loss, Zoph et al. 2022, eq. 5), layer means.",
      "- **aux-loss-free**: a per-expert bias on the routing scores for top-k selection only, b_i += γ · "
      "sign(mean load − load_i) after each step (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3 sec. 2.1.2).", "",
      markdown_table(headline_rows(report)), "",
      f"MaxVio train: the training batches' MaxVio, mean over MoE layers and over the last {s['maxvio_last']} logged "
      f"steps. MaxVio global: the final model's load over all {report['val_tokens']:,} validation tokens. Sampling "
      f"floors (uniform random router): {report['sampling_floor']['train']:.3f} per training batch, "
      f"{report['sampling_floor']['val']:.3f} over the validation tokens. Expert load in multiples of the uniform "
      "share 1/E, min and max over all layers and experts, from the same training steps as MaxVio train.", "",
      "![MaxVio](maxvio.png)", "", "![loss curves](loss_curves.png)", "", "![expert load](expert_load.png)", "",
      "## Discussion", "",
  ]
  lines += [f"- {p}" for p in discussion(report)]
  lines += [
      "", "## How each number was obtained", "",
      "- MaxVio = (max_i load_i − mean) / mean with load_i expert i's share of the T·k assignments (Wang et al. "
      "2024, eq. 6). Train: `moe_load` of each logged step in metrics.jsonl (one training batch; with gradient "
      "accumulation, the mean over micro-batches). Global: the final model run over the fixed validation batches, "
      "loads summed over all of them, then MaxVio per layer, then the mean over layers.",
      "- Sampling floor: the mean MaxVio of 64 simulated routers whose every token picks k distinct experts "
      "uniformly at random, at the training batch's and the validation set's token counts.",
      "- Validation loss: the training loop's final evaluation; Δ is the mean over the same validation batches of "
      "(this run's NLL − the aux-loss run's NLL) with its standard error. Curves: metrics.jsonl; the training curve "
      "is log(perplexity), the cross-entropy without the balancing terms.",
      "- Bias: each final model's `balance_bias` (train state `model_state`).",
      "", f"Machine: {report['machine']}. Training time over the three runs: "
      f"{sum(r['train_time_s'] for r in report['runs'].values()) / 60:.1f} min (summed over the invocations that "
      f"trained them); this invocation of the study: {report['wall_time_s'] / 60:.1f} min.", "",
  ]
  (out_dir / "report.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------- the study
def run_study(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """Trains the three runs (resuming if rerun), measures them, and writes report.md, report.json, maxvio.png,
  loss_curves.png and expert_load.png into `config.study.out_dir` (plus train_times.json, each run's training time
  summed over the invocations that trained it). Returns the report dict (what report.json holds)."""
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

  m, k = ref.model, ref.model.num_experts_per_tok
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
          "num_kv_heads": m.num_kv_heads or m.num_heads, "n_routed_experts": m.n_routed_experts,
          "n_shared_experts": m.n_shared_experts, "num_experts_per_tok": k,
          "expert_width": m.moe_intermediate_size or m.d_ff, "router_scoring": m.router_scoring,
          "moe_dispatch": m.moe_dispatch, "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len,
          "seed": ref.train.seed, "data_seed": ref.data.seed, "batch_size": ref.train.batch_size,
          "learning_rate": ref.train.learning_rate,
      },
      "study": s.to_dict(),
      "sampling_floor": floors,
      "runs": runs,
      "files": ["report.md", "report.json", "maxvio.png", "loss_curves.png", "expert_load.png"],
  }
  title = f"MoE load balancing ({report['name']})"
  plot_maxvio(runs, floors, out_dir / "maxvio.png", title)
  plot_losses(runs, out_dir / "loss_curves.png", title)
  plot_load(runs, out_dir / "expert_load.png", title)
  report["wall_time_s"] = time.perf_counter() - started
  return save_report(report, out_dir, headline_rows, write_report)


if __name__ == "__main__":
  run_cli(run_study, "configs/moe_balance.py:tiny", markdown_table)
