"""The MHA vs MLA study's report, drawn from its report.json alone (what `experiments.mla_vs_mha` measures and
writes): the headline table, the discussion and report.md, the loss curves and the memory figure. It never trains or
measures, so a report can be redrawn, e.g. after a change of wording, without the runs:

  python -m superlm_jax.experiments.mla_vs_mha_report --report=runs/mla_vs_mha/report.json
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from superlm_jax.experiments.common import finish_step_panels, markdown_table, report_cli, report_markdown

HEADLINE_HEADER = ("metric", "MHA", "MLA", "MLA/MHA")
MIB = 2**20


def _finite(v) -> bool:
  """A number to print: report.json holds a non-finite measurement as null."""
  return v is not None and math.isfinite(v)


# ---------------------------------------------------------------------------------------------- figures
def plot_losses(models: dict[str, dict], path: Path, title: str) -> None:
  """Training and validation loss curves of both runs (from their metrics.jsonl, as the report holds them)."""
  from matplotlib.figure import Figure  # No pyplot: no global state, no display needed.
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, 2)
  colors = {"mha": "tab:blue", "mla": "tab:orange"}
  for name, model in models.items():
    train_points = [(step, loss) for step, loss in model.get("train_curve", []) if loss is not None]
    val_points = [(step, loss) for step, loss in model["val_curve"] if loss is not None]
    if train_points:
      axes[0].plot(*zip(*train_points), color=colors[name], label=name.upper(), linewidth=1.2)
    if val_points:
      axes[1].plot(*zip(*val_points), color=colors[name], label=name.upper(), marker="o")
  finish_step_panels(fig, axes, ("training loss", "validation loss"), title, path)


def plot_memory(models: dict[str, dict], path: Path, title: str) -> None:
  """The decode cache per token, and the cache next to the training step's XLA buffers at the long context."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, 2)
  names = list(models)
  colors = ["tab:blue", "tab:orange"]
  per_token = [models[n]["kv_cache"]["bytes_per_token"] for n in names]
  axes[0].bar([n.upper() for n in names], per_token, color=colors)
  axes[0].set_ylabel("bytes per token (bf16, all layers)")
  axes[0].set_title("decode KV cache per token")
  groups = ["KV cache", "training step\n(XLA buffers)"]
  x = np.arange(len(groups))
  for i, n in enumerate(names):
    values = [models[n]["kv_cache"]["long_context_bytes"] / MIB, models[n]["train_memory_long_context"]["total"] / MIB]
    axes[1].bar(x + (i - 0.5) * 0.38, values, width=0.38, color=colors[i], label=n.upper())
  lc = models[names[0]]["kv_cache"]
  axes[1].set_xticks(x, groups)
  axes[1].set_yscale("log")
  axes[1].set_ylabel("MiB (log scale)")
  axes[1].set_title(f"memory at {lc['long_context_tokens']} tokens x batch {lc['long_context_batch']}")
  axes[1].legend()
  for ax in axes:
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- report
def _fmt_int(v: float) -> str:
  return f"{int(v):,}"


def _fmt_mib(v: float) -> str:
  return f"{v / MIB:,.2f} MiB"


def headline_rows(report: dict) -> list[tuple[str, str, str, str]]:
  """(metric, MHA, MLA, MLA/MHA) rows of the headline table."""
  m = report["models"]
  s = report["study"]

  def row(label, getter, fmt):
    a, b = getter(m["mha"]), getter(m["mla"])
    ratio = f"{b / a:.3f}" if a and _finite(a) and _finite(b) else "n/a"
    return (label, fmt(a) if _finite(a) else "n/a", fmt(b) if _finite(b) else "n/a", ratio)

  return [
      row("parameters (total)", lambda r: r["parameters"]["total"], _fmt_int),
      row("parameters (attention only)", lambda r: r["parameters"]["attention"], _fmt_int),
      row("KV cache values / token / layer", lambda r: r["kv_cache"]["values_per_token_per_layer"], _fmt_int),
      row("KV cache bytes / token (bf16, all layers)", lambda r: r["kv_cache"]["bytes_per_token"], _fmt_int),
      row(f"KV cache at {s['long_context']} tokens x batch {s['long_context_batch']} (bf16)",
          lambda r: r["kv_cache"]["long_context_bytes"], _fmt_mib),
      row(f"training-step memory at {s['long_context']} tokens x batch {s['long_context_batch']} (XLA buffers)",
          lambda r: r["train_memory_long_context"]["total"], _fmt_mib),
      row(f"training-step memory at the training shape {s['train_shape']} (XLA buffers)",
          lambda r: r["train_memory_train_shape"]["total"], _fmt_mib),
      row("training FLOPs / token (accounting)", lambda r: r["flops_per_token"], lambda v: f"{v / 1e6:,.2f} M"),
      row("train step time, timed separately (median window)", lambda r: r["step_time_s"],
          lambda v: f"{1e3 * v:,.1f} ms"),
      row("train step time, timed separately (fastest window)", lambda r: r["step_time_min_s"],
          lambda v: f"{1e3 * v:,.1f} ms"),
      row("train step time, from metrics.jsonl tokens/s (median)", lambda r: r["step_time_s_metrics"],
          lambda v: f"{1e3 * v:,.1f} ms"),
      row(f"decode tokens/s (greedy, batch 1, {s['decode_prompt']}-token prompt, fastest of {s['decode_repeats']})",
          lambda r: r["decode"]["tokens_per_s"], lambda v: f"{v:,.1f}"),
      row("prefill to first token", lambda r: r["decode"]["first_token_s"], lambda v: f"{1e3 * v:,.1f} ms"),
      row("final validation loss (nats/token)", lambda r: r["final_val_loss"], lambda v: f"{v:.4f}"),
      row("training time (summed over the invocations that trained it)", lambda r: r.get("train_time_s"),
          lambda v: f"{v / 60:,.1f} min"),
  ]


def discussion(report: dict) -> list[str]:
  """Short conclusions drawn from the numbers (not written in advance)."""
  m, s = report["models"], report["study"]
  mha, mla = m["mha"], m["mla"]
  cfg = report["config"]
  out = []
  factor = mha["kv_cache"]["bytes_per_token"] / mla["kv_cache"]["bytes_per_token"]
  out.append(
      f"**Decode cache.** MLA caches {mla['kv_cache']['values_per_token_per_layer']} values per token and layer "
      f"(kv_lora_rank {cfg['mla']['kv_lora_rank']} + one shared rotary key of {cfg['mla']['qk_rope_head_dim']}) "
      f"against MHA's {mha['kv_cache']['values_per_token_per_layer']} (2 x {cfg['num_heads']} heads x "
      f"{cfg['head_dim']}): **{factor:.2f}x smaller**, exactly as the accounting formula says and as the buffers "
      "`init_cache` allocates confirm. The latent is narrower than the model width "
      f"({cfg['mla']['kv_lora_rank']} < d_model {cfg['d_model']}), so this MLA really compresses (the reference project's did not).")
  mem_ratio = mla["train_memory_long_context"]["total"] / mha["train_memory_long_context"]["total"]
  mem_verdict = (
      "MLA does not shrink training memory: training uses the expanded form, which rebuilds per-head keys and "
      "values from the latent, and the [batch, heads, T, T] attention scores are the same size for both"
      if mem_ratio > 0.95 else
      "MLA needs less here; its saving in training comes from narrower projections, not from the cache, which "
      "training does not use")
  out.append(
      f"**Training memory.** At {s['long_context']} tokens x batch {s['long_context_batch']} XLA plans "
      f"{_fmt_mib(mha['train_memory_long_context']['total'])} for MHA and "
      f"{_fmt_mib(mla['train_memory_long_context']['total'])} for MLA (MLA/MHA {mem_ratio:.2f}). {mem_verdict}. "
      "These are XLA's compiled buffer assignments (arguments + outputs - donated aliases + temporaries), not "
      "measured RSS.")
  t_ratio = mla["step_time_min_s"] / mha["step_time_min_s"]
  t_median_ratio = mla["step_time_s"] / mha["step_time_s"]
  f_ratio = mla["flops_per_token"] / mha["flops_per_token"]
  spread = max(max(r["step_window_times_s"]) / min(r["step_window_times_s"]) for r in (mha, mla))
  if t_ratio > 1.1 * f_ratio:
    why = ("MLA's extra, smaller matmuls (latent down-projection, per-head up-projections of keys and values, the "
           "separate rotary part) cost more time than their FLOP count suggests at these widths")
  elif t_ratio < f_ratio / 1.1:
    why = "MLA runs faster than its FLOP count predicts"
  else:
    why = "time follows the FLOP count"
  noise = (f"The timing windows of one model differed by up to {spread:.2f}x, so the machine was busy with other "
           "work while timing: these ratios are unreliable, and a rerun on an idle machine (the training is not "
           "repeated) gives better ones." if spread > 1.15 else
           f"The timing windows of one model agreed within {100 * (spread - 1):.0f}%.")
  out.append(
      f"**Step time.** On this machine ({report['machine']}) an MLA training step takes {t_ratio:.2f}x the MHA "
      f"step in the fastest windows ({t_median_ratio:.2f}x in the median ones), and its model FLOPs per token are "
      f"{f_ratio:.2f}x MHA's: {why}. {noise}")
  d_ratio = mla["decode"]["tokens_per_s"] / mha["decode"]["tokens_per_s"]
  context = s["decode_prompt"] + s["decode_tokens"]
  if d_ratio < 1.1:
    decode_why = (f"With a {context}-token context, batch 1 and a model this small, a decode step is bound by "
                  "per-step overhead and weight reads, not by reading the cache, so the smaller cache does not show "
                  "as speed here; it pays when the cache dominates memory traffic (long contexts, large batches)")
  else:
    decode_why = "MLA decodes faster even at this size"
  decode_spread = max(max(r["decode"]["repeat_step_s"]) / min(r["decode"]["repeat_step_s"]) for r in (mha, mla))
  if decode_spread > 1.15:
    decode_why += (f". The timed generations of one model differed by up to {decode_spread:.2f}x (other work on the "
                   "machine), so this ratio is unreliable")
  out.append(
      f"**Decode speed.** Greedy decoding runs at {mha['decode']['tokens_per_s']:.0f} tokens/s for MHA and "
      f"{mla['decode']['tokens_per_s']:.0f} for MLA ({mla['decode']['form']} form), MLA/MHA {d_ratio:.2f}. "
      f"{decode_why}.")
  loss = report["loss_difference"]
  within = abs(loss["mean"]) <= 2 * loss["se"]
  verdict = ("within two standard errors of zero" if within else
             f"{'worse' if loss['mean'] > 0 else 'better'} for MLA by more than two standard errors")
  out.append(
      f"**Quality.** After {report['steps']} steps the validation loss is {mha['final_val_loss']:.4f} (MHA) and "
      f"{mla['final_val_loss']:.4f} (MLA) nats/token. The paired difference MLA - MHA over the same "
      f"{loss['n']} validation batches is {loss['mean']:+.4f} +- {loss['se']:.4f} (standard "
      f"error), {verdict}. That error covers the choice of validation text only: each model was trained once, with "
      "one seed, so seed-to-seed variation is not measured and a difference of a few hundredths of a nat may be "
      f"noise of that kind. MLA has {mla['parameters']['attention'] / mha['parameters']['attention']:.2f}x MHA's "
      "attention parameters here, so the comparison is at equal width, not equal parameters.")
  return out


def write_report(report: dict, out_dir: str | Path) -> None:
  """report.md, loss_curves.png and memory.png in `out_dir`, from `report` (a report.json) alone."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  title = f"MHA vs MLA ({report['name']})"
  plot_losses(report["models"], out_dir / "loss_curves.png", title)
  plot_memory(report["models"], out_dir / "memory.png", title)
  rows = headline_rows(report)
  s = report["study"]
  lines = [
      f"# MHA vs MLA: {report['name']}", "",
      f"Two Llama-style decoders (d_model {report['config']['d_model']}, {report['config']['num_layers']} layers, "
      f"{report['config']['num_heads']} heads, SwiGLU {report['config']['d_ff']}, RoPE, vocab "
      f"{report['config']['vocab_size']}) trained for {report['steps']} steps of {s['train_shape']} tokens on the same "
      f"data in the same order (data seed {report['config']['data_seed']}, train seed {report['config']['seed']}); "
      "only the attention differs. MLA is DeepSeek-V2's Multi-head Latent Attention (arXiv 2405.04434, sec. 2.1), "
      f"ranks {report['config']['mla']}.", "",
      markdown_table(HEADLINE_HEADER, rows), "",
      "![loss curves](loss_curves.png)", "", "![memory](memory.png)", "",
  ]
  methods = [
      "- Parameters: `models.accounting.parameter_count`, attention share from the same formulas; both checked "
      "equal to the built model's `nnx.Param` leaves.",
      "- KV cache: `accounting.kv_cache_bytes_per_token(bytes_per_value=2)`, checked against the buffers "
      "`init_cache` allocates in bf16. At long context: bytes/token x tokens x batch.",
      "- Training-step memory: the jitted train step (forward, backward, AdamW update; float32 unless "
      "train.compute_dtype says otherwise) compiled ahead of time and read with `compiled.memory_analysis()`: "
      "argument + output - alias + temp bytes. This is XLA's buffer assignment, not RSS. Long-context figures use "
      "a model built with max_seq_len = long_context; with RoPE its parameters are identical.",
      f"- Step time: the jitted train step at the training shape, {s['timing_windows']} windows of "
      f"{s['timing_steps']} steps alternating between the models after two warm-up steps; the median and the "
      "fastest window (other load on the machine only ever adds time). The "
      "metrics.jsonl row converts the median of the runs' logged tokens/s (windows between logs) to seconds/step.",
      f"- Decode: `Generator` greedy, batch 1, prompt = the first {s['decode_prompt']} tokens of a validation window, "
      f"{s['decode_tokens']} new tokens, float32 cache; one warm-up generation, then the fastest of "
      f"{s['decode_repeats']} (report.json also has the median). Tokens/s counts single-token steps; the first "
      "token includes the prefill.",
      "- Loss: final validation loss from the training loop; curves from metrics.jsonl. The paired difference: "
      "each model's per-token NLL (`training.evaluate.make_token_nll`, one padded batch shape) averaged per "
      "validation batch, then the mean and standard error of the per-batch differences.",
      "- Training time: each run's training, summed over the invocations of the study that trained it "
      "(train_times.json); a rerun of a finished study only restores the runs.",
  ]
  (out_dir / "report.md").write_text(report_markdown(lines, discussion(report), methods, report, report["models"]))


if __name__ == "__main__":
  report_cli(write_report, "mla_vs_mha")
