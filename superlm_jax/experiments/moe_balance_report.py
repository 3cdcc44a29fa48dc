"""The MoE load-balancing study's report: report.md and its three figures, drawn from report.json alone.

  python -m superlm_jax.experiments.moe_balance_report --report=runs/moe_balance/report.json

`superlm_jax.experiments.moe_balance` trains and measures, and writes report.json; everything here only reads that
dict, so the page and the figures can be redrawn (new wording, a fixed plot) without training or evaluating
anything. The runs are the report's `runs`, in report order: no_balancing, aux_loss, aux_free.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from superlm_jax.experiments.common import finish_step_panels, markdown_table, report_cli, report_markdown

LABELS = {"no_balancing": "no balancing", "aux_loss": "aux loss (Switch + z)", "aux_free": "aux-loss-free (bias)"}
COLORS = {"no_balancing": "tab:gray", "aux_loss": "tab:blue", "aux_free": "tab:red"}
HEADER = ("scheme", "α / β / γ", "final val loss", "Δ val loss vs aux loss (± s.e.)", "MaxVio train (last logs)",
          "MaxVio global (val)", "min / max expert load (× uniform)", "max abs bias", "train time")
FIGURES = ("maxvio.png", "loss_curves.png", "expert_load.png")


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
  finish_step_panels(fig, axes, ("training cross-entropy", "validation loss"), title, path)


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
  """One row per run, columns as in HEADER."""
  rows = []
  for name, r in report["runs"].items():
    c = r["coefficients"]
    if name == "aux_loss":
      diff = "(reference)"
    else:
      d = r["val_diff_vs_aux_loss"]
      diff = f"{d['mean']:+.4f}" + ("" if d["se"] is None else f" ± {d['se']:.4f}")  # No SE from one batch.
    rows.append((LABELS[name], f"{c['alpha']:g} / {c['beta']:g} / {c['gamma']:g}", f"{r['final_val_loss']:.4f}",
                 diff, f"{r['maxvio_train']:.3f}", f"{r['maxvio_global']:.3f}",
                 f"{r['load_train_min']:.2f} / {r['load_train_max']:.2f}", f"{r['bias_abs_max']:.4f}",
                 f"{r['train_time_s'] / 60:.1f} min"))
  return rows


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
    within = abs(d["mean"]) <= 2 * d["se"]
    return ("within two standard errors of the auxiliary-loss run" if within else
            f"{'worse' if d['mean'] > 0 else 'better'} than the auxiliary-loss run by more than two standard errors")
  d_free, d_none = free["val_diff_vs_aux_loss"], none["val_diff_vs_aux_loss"]
  best = min(runs, key=lambda name: runs[name]["final_val_loss"])
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
      f"{d_free['n']} validation batches, aux-loss-free - aux loss = {d_free['mean']:+.4f} ± "
      f"{d_free['se']:.4f} ({verdict_of(d_free)}); no balancing - aux loss = {d_none['mean']:+.4f} ± "
      f"{d_none['se']:.4f} ({verdict_of(d_none)}). Wang et al. expect aux-loss-free to be at least as "
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


def markdown(report: dict) -> str:
  """report.md's text."""
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
      markdown_table(HEADER, headline_rows(report), left=2), "",
      f"MaxVio train: the training batches' MaxVio, mean over MoE layers and over the last {s['maxvio_last']} logged "
      f"steps. MaxVio global: the final model's load over all {report['val_tokens']:,} validation tokens. Sampling "
      f"floors (uniform random router): {report['sampling_floor']['train']:.3f} per training batch, "
      f"{report['sampling_floor']['val']:.3f} over the validation tokens. Expert load in multiples of the uniform "
      "share 1/E, min and max over all layers and experts, from the same training steps as MaxVio train.", "",
      "![MaxVio](maxvio.png)", "", "![loss curves](loss_curves.png)", "", "![expert load](expert_load.png)", "",
  ]
  methods = [
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
  ]
  return report_markdown(lines, discussion(report), methods, report, report["runs"])


def write_report(report: dict, out_dir: str | Path) -> None:
  """report.md and the figures (FIGURES) into `out_dir`, from a JSON-able report (what report.json holds)."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  runs, title = report["runs"], f"MoE load balancing ({report['name']})"
  plot_maxvio(runs, report["sampling_floor"], out_dir / "maxvio.png", title)
  plot_losses(runs, out_dir / "loss_curves.png", title)
  plot_load(runs, out_dir / "expert_load.png", title)
  (out_dir / "report.md").write_text(markdown(report))


if __name__ == "__main__":
  report_cli(write_report, "moe_balance")
