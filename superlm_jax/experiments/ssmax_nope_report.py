"""The SSMax x NoPE study's report, drawn from its report.json alone: report.md and the figures loss_curves.png,
position_loss.png and probe.png. `superlm_jax.experiments.ssmax_nope` measures and calls `write_report`; a report
can be rewritten (new prose, new figures) without retraining or re-evaluating anything:

  python -m superlm_jax.experiments.ssmax_nope_report --report=runs/ssmax_nope/report.json
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from superlm_jax.experiments.common import finish_step_panels, markdown_table, report_cli, report_markdown

POSITION_LABELS = {"learned": "learned", "none": "NoPE", "rope": "RoPE"}
SCORING_LABELS = {"softmax": "softmax", "ssmax": "SSMax"}
COLORS = {"learned": "tab:gray", "none": "tab:blue", "rope": "tab:red"}
LINESTYLES = {"softmax": "-", "ssmax": "--"}
FIGURES = ("loss_curves.png", "position_loss.png", "probe.png")


def label(run: dict) -> str:
  """A run's name in the report, from its record in report.json, e.g. "SSMax + NoPE"."""
  return f"{SCORING_LABELS[run['scoring']]} + {POSITION_LABELS[run['positions']]}"


# ---------------------------------------------------------------------------------------------- figures
def _style(run: dict) -> dict:
  """One look per variant in every figure: colour by positions, line style by scoring."""
  return dict(color=COLORS[run["positions"]], linestyle=LINESTYLES[run["scoring"]], label=label(run))


def plot_losses(runs: dict[str, dict], path: Path, title: str) -> None:
  """Training and validation loss curves (from each run's metrics.jsonl), one line per variant."""
  from matplotlib.figure import Figure  # No pyplot: no global state, no display needed.
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, 2)
  for run in runs.values():
    if run["train_curve"]:
      axes[0].plot(*zip(*run["train_curve"]), linewidth=1.1, **_style(run))
    if run["val_curve"]:
      axes[1].plot(*zip(*run["val_curve"]), marker="o", markersize=3, **_style(run))
  finish_step_panels(fig, axes, ("training loss", "validation loss"), title, path, legend_size=8)


def _bucketed(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Bucket centres and means of `values` in buckets of `width` positions (the last may be shorter)."""
  starts = np.arange(0, len(values), width)
  means = np.array([values[s:s + width].mean() for s in starts])
  centres = np.array([s + (min(width, len(values) - s) - 1) / 2 for s in starts])
  return centres, means


def plot_position_loss(runs: dict[str, dict], train_length: int, eval_length: int, unigram: float, path: Path,
                       title: str) -> None:
  """Validation loss vs position (bucketed), one line per variant, a vertical line at the training length; the
  right panel zooms in on the range where the variants differ by hundredths."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(12, 4.6), layout="constrained")
  axes = fig.subplots(1, 2)
  width = max(1, eval_length // 32)
  lows, highs = [], []
  for run in runs.values():
    values = np.asarray(run["position_loss"]["per_position"], np.float64)
    x, y = _bucketed(values, width)
    for ax in axes:
      ax.plot(x, y, linewidth=1.4, **_style(run))
    tail = y[x >= width]  # Past the first bucket, whose few tokens of context make it high for everyone.
    if tail.size:
      lows.append(tail.min())
      highs.append(tail[x[x >= width] < train_length].max() if (x[x >= width] < train_length).any() else tail.max())
  for ax in axes:
    ax.axvline(train_length, color="black", linewidth=1, linestyle=":", label=f"training length {train_length}")
    ax.axhline(unigram, color="tab:green", linewidth=0.8, linestyle="-.", label=f"unigram baseline {unigram:.2f}")
    ax.set_xlabel(f"position in the window (buckets of {width} tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_xlim(0, eval_length)
    ax.grid(alpha=0.3)
  axes[0].set_title("loss per position (learned positions: first T tokens only)")
  if lows:
    low, high = min(lows), max(highs)
    pad = 0.25 * (high - low) + 0.05
    axes[1].set_ylim(low - pad, high + 2 * pad)
  axes[1].set_title("zoomed in")
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


def plot_probe(runs: dict[str, dict], factors: list[int], train_length: int, path: Path, title: str) -> None:
  """Probe accuracy (planted: solid markers, control: hollow) and log-probability gain vs context length."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(12, 4.6), layout="constrained")
  axes = fig.subplots(1, 2)
  for run in runs.values():
    style = _style(run)
    points = [(f * train_length, run["probe"][str(f)]) for f in factors if run["probe"].get(str(f))]
    if not points:
      continue
    x = [p[0] for p in points]
    axes[0].errorbar(x, [p[1]["acc_planted"]["mean"] for p in points],
                     yerr=[p[1]["acc_planted"]["se"] for p in points], marker="o", capsize=3, **style)
    axes[0].plot(x, [p[1]["acc_control"]["mean"] for p in points], marker="o", markerfacecolor="none",
                 color=style["color"], linestyle=":", linewidth=0.8)
    axes[1].errorbar(x, [p[1]["gain"]["mean"] for p in points], yerr=[p[1]["gain"]["se"] for p in points],
                     marker="o", capsize=3, **style)
  for ax in axes:
    ax.axvline(train_length, color="black", linewidth=1, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks([f * train_length for f in factors], [f"{f * train_length}\n({f}x)" for f in factors])
    ax.set_xlabel("context length (tokens); the key is planted near the start")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("top-1 accuracy on the repeated key")
  axes[0].set_title("copy accuracy (filled: key planted, hollow dotted: control)")
  axes[0].set_ylim(-0.03, 1.03)
  axes[1].axhline(0, color="black", linewidth=0.8)
  axes[1].set_ylabel("log p(key | planted) - log p(key | control), nats/token")
  axes[1].set_title("log-probability gain from the planted key")
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- report
def _fmt(v, spec: str = ".3f") -> str:
  return "n/a" if v is None else format(v, spec)


def _fmt_pm(d: dict | None, spec: str = "+.3f") -> str:
  """mean ± standard error, the error with as many decimals as the mean."""
  if d is None:
    return "n/a"
  return f"{format(d['mean'], spec)} ± {format(d['se'], spec.lstrip('+'))}"


def headline_rows(report: dict) -> list[tuple[str, ...]]:
  """One row per variant under `header`: parameters, final validation loss, loss per segment, probe results."""
  factors, rows = report["study"]["probe_factors"], []
  for r in report["runs"].values():
    segs = [_fmt(s["mean"]) for s in r["position_loss"]["segments"]]
    acc = " / ".join(_fmt(r["probe"][str(f)]["acc_planted"]["mean"], ".2f") if r["probe"].get(str(f)) else "n/a"
                     for f in factors)
    gain = " / ".join(_fmt(r["probe"][str(f)]["gain"]["mean"], "+.3f") if r["probe"].get(str(f)) else "n/a"
                      for f in factors)
    rows.append((label(r), f"{r['parameters']:,}", f"{r['final_val_loss']:.4f}", *segs, acc, gain))
  return rows


def header(report: dict) -> tuple[str, ...]:
  """The headline's column names, which depend on the segments and probe lengths (report.json keeps them)."""
  T = report["train_length"]
  segs = tuple(f"loss at positions {a // T}-{b // T}x T" if a else "loss at positions < T"
               for a, b in ((s["start"], s["end"]) for s in next(iter(report["runs"].values()))["position_loss"]
                            ["segments"]))
  factors = "/".join(f"{f}x" for f in report["study"]["probe_factors"])
  return ("variant", "parameters", "val loss (T)", *segs, f"probe accuracy {factors}",
          f"probe gain {factors} (nats)")


def comparison_rows(report: dict) -> list[tuple[str, ...]]:
  """SSMax - softmax per position scheme, paired over the same windows and probe trials."""
  factors, rows = report["study"]["probe_factors"], []
  for positions, d in report["ssmax_minus_softmax"].items():
    segs = [_fmt_pm(x) for x in d["segments"]]
    acc = [_fmt_pm(d["probe"].get(str(f), {}).get("acc_planted"), "+.2f") for f in factors]
    gain = [_fmt_pm(d["probe"].get(str(f), {}).get("gain"), "+.3f") for f in factors]
    rows.append((POSITION_LABELS[positions], *segs, *acc, *gain))
  return rows


def comparison_header(report: dict) -> tuple[str, ...]:
  T = report["train_length"]
  first = next(iter(report["runs"].values()))
  segs = tuple(f"Δ loss {s['start'] // T}-{s['end'] // T}x T" if s["start"] else "Δ loss < T"
               for s in first["position_loss"]["segments"])
  factors = report["study"]["probe_factors"]
  return ("positions", *segs, *(f"Δ accuracy {f}x" for f in factors), *(f"Δ gain {f}x" for f in factors))


def context_rows(report: dict) -> list[tuple[str, ...]]:
  """Loss over positions [T, eval length) with the whole window as context vs with the context restarted every T."""
  rows = []
  for r in report["runs"].values():
    b = r["beyond_training_length"]
    rows.append((label(r), _fmt(b["whole_window"]), _fmt(b["restarted"]), _fmt_pm(b.get("difference"))))
  return rows


def discussion(report: dict) -> list[str]:
  """Conclusions drawn from the numbers (not written in advance)."""
  runs, T, out = report["runs"], report["train_length"], []
  E = report["eval_length"]
  names = list(runs)

  def name_of(n: str) -> str:
    return label(runs[n])

  def verdict(d, better="lower"):
    if d is None:
      return "n/a"
    if not math.isfinite(d["se"]) or abs(d["mean"]) <= 2 * d["se"]:
      return "within two standard errors of zero"
    good = d["mean"] < 0 if better == "lower" else d["mean"] > 0
    return f"{'better' if good else 'worse'} with SSMax by more than two standard errors"

  # Quality at the training length.
  best = min(names, key=lambda n: runs[n]["final_val_loss"])
  worst = max(names, key=lambda n: runs[n]["final_val_loss"])
  parts = [f"{name_of(n)} {runs[n]['final_val_loss']:.4f}" for n in names]
  cmp = report["ssmax_minus_softmax"]
  in_range = [f"{POSITION_LABELS[p]} {_fmt_pm(d['segments'][0], '+.4f')} ({verdict(d['segments'][0])})"
              for p, d in cmp.items()]
  out.append(
      f"**At the training length.** Final validation loss at T = {T}: {', '.join(parts)} nats/token (best "
      f"{name_of(best)}, worst {name_of(worst)}, a spread of "
      f"{runs[worst]['final_val_loss'] - runs[best]['final_val_loss']:.3f}"
      f"; unigram baseline {report['unigram_val_loss']:.3f}). SSMax - softmax over positions < T of the same "
      f"{report['position_windows']} validation windows: " + ("; ".join(in_range) if in_range else
                                                               "no softmax/SSMax pair was run") + ".")
  differences = report.get("positions_differences", {})
  if differences:
    def named(pair, d):
      a, b = (POSITION_LABELS["none" if x == "nope" else x] for x in pair.split("-"))
      if not math.isfinite(d["se"]) or abs(d["mean"]) <= 2 * d["se"]:
        how = "within two standard errors of zero"
      else:
        how = f"{a} {'worse' if d['mean'] > 0 else 'better'} by more than two standard errors"
      return f"{a} - {b} {_fmt_pm(d, '+.4f')} ({how})"
    text = "; ".join(f"{SCORING_LABELS[s]}: " + ", ".join(named(pair, d) for pair, d in pairs.items())
                     for s, pairs in differences.items())
    out.append(
        f"**Position schemes (< T).** Paired over the same windows: {text} nats/token. Haviv et al. 2022 report "
        "NoPE close to but slightly behind learned positions (20.97 vs 20.42 perplexity, WikiText-103, 247M "
        "parameters): the causal mask alone lets a decoder infer order.")

  # Length generalisation.
  long = [n for n in names if runs[n]["positions"] != "learned"]
  if long and len(runs[long[0]]["position_loss"]["segments"]) > 1:
    lines = []
    for n in long:
      segs = runs[n]["position_loss"]["segments"]
      near = runs[n]["near_end_loss"]
      lines.append(f"{name_of(n)}: {near:.3f} just before T, then " +
                   ", ".join(f"{s['mean']:.3f} at {s['start'] // T}-{s['end'] // T}x" for s in segs[1:]))
    rise = {n: runs[n]["position_loss"]["segments"][-1]["mean"] - runs[n]["near_end_loss"] for n in long}
    best_rise, worst_rise = min(long, key=rise.get), max(long, key=rise.get)
    beyond = [f"{POSITION_LABELS[p]} {_fmt_pm(d['segments'][-1], '+.3f')} ({verdict(d['segments'][-1])})"
              for p, d in cmp.items() if p != "learned" and d["segments"][-1] is not None]
    out.append(
        f"**Beyond the training length.** Mean loss over the last quarter of the trained range [{3 * T // 4}, {T}) "
        f"against the segments past it: {'; '.join(lines)}. A model that generalises in length keeps the loss flat "
        f"or falling past T (more context can only help a good model); the smallest rise from [3T/4, T) to the last "
        f"segment is {name_of(best_rise)}'s ({rise[best_rise]:+.3f}), the largest {name_of(worst_rise)}'s "
        f"({rise[worst_rise]:+.3f}). SSMax - softmax in the last segment (up to {E} tokens): "
        + ("; ".join(beyond) if beyond else "no NoPE/RoPE pair was run") +
        ". Learned positions have no row past T and are not evaluated there.")
    for scoring in ("softmax", "ssmax"):
      nope, rope = f"{scoring}_nope", f"{scoring}_rope"
      if nope not in rise or rope not in rise:
        continue
      last = {n: runs[n]["position_loss"]["segments"][-1]["mean"] for n in (nope, rope)}
      direction = ("the smaller, the direction Kazemnejad et al. 2023 report for length generalisation (on their "
                   "synthetic tasks)" if rise[nope] < rise[rope] else
                   "not the smaller, unlike what Kazemnejad et al. 2023 report for length generalisation (on their "
                   "synthetic tasks)")
      ahead = "RoPE" if last[rope] < last[nope] else "NoPE"
      out.append(
          f"**NoPE vs RoPE past T ({SCORING_LABELS[scoring]}).** NoPE's rise ({rise[nope]:+.3f}, RoPE's "
          f"{rise[rope]:+.3f}) is {direction}. "
          f"In absolute loss over the last segment {ahead} is ahead ({last[nope]:.3f} NoPE vs {last[rope]:.3f} "
          "RoPE)" + (": RoPE's lead at T is larger than what it loses past T." if ahead == "RoPE" and
                     rise[nope] < rise[rope] else "."))
    ssmax_long = [n for n in long if runs[n]["scoring"] == "ssmax"]
    if ssmax_long and any(d["segments"][-1] is not None and d["segments"][-1]["mean"] > 2 * d["segments"][-1]["se"]
                          for p, d in cmp.items() if p != "learned"):
      out.append(
          f"**Why SSMax can extrapolate worse.** Past T the multiplier s_h log n_i keeps growing: at {E} tokens it "
          f"is log {E} / log {T} = {math.log(E) / math.log(T):.2f}x its largest value in training, so every "
          "SSMax head attends more sharply than anywhere it was trained, while a softmax head spreads its weight "
          "over more keys. Nakanishi 2025 designs the "
          "scaling so that a key that stands out keeps its weight as n grows, which matters for retrieval; for "
          "the local statistics that dominate language-modelling loss at this scale, the sharper attention is a "
          "distribution shift. This reading fits the numbers but was not tested separately (e.g. by capping n "
          "at T).")
    restart = [(n, runs[n]["beyond_training_length"]) for n in long]
    text = "; ".join(f"{name_of(n)} {b['whole_window']:.3f} vs {b['restarted']:.3f} "
                     f"({_fmt_pm(b['difference'], '+.3f')})" for n, b in restart)
    helped = [name_of(n) for n, b in restart if b["difference"]["mean"] < -2 * b["difference"]["se"]]
    hurt = [name_of(n) for n, b in restart if b["difference"]["mean"] > 2 * b["difference"]["se"]]
    learned_restart = [f"{name_of(n)} {runs[n]['beyond_training_length']['restarted']:.3f}" for n in names
                       if runs[n]["positions"] == "learned"]
    out.append(
        f"**Does context past T help?** Loss over positions [{T}, {E}) with the whole window as context vs the "
        f"same tokens with the context restarted every {T} tokens (no position past the trained range): {text}. "
        + (f"Context past T helps {', '.join(helped)}. " if helped else "No variant profits from context past T. ")
        + (f"It hurts {', '.join(hurt)}: "
           "these models would do better reading the text in trained-length pieces. " if hurt else "")
        + ("With restarts, learned positions reach " + ", ".join(learned_restart) + " on the same tokens."
           if learned_restart else ""))

  # Retrieval.
  factors = report["study"]["probe_factors"]
  lines = []
  for n in names:
    cells = [f"{f}x {runs[n]['probe'][str(f)]['acc_planted']['mean']:.2f} "
             f"(gain {runs[n]['probe'][str(f)]['gain']['mean']:+.3f})" for f in factors if runs[n]["probe"].get(str(f))]
    lines.append(f"{name_of(n)}: {', '.join(cells)}")
  control = max(runs[n]["probe"][str(f)]["acc_control"]["mean"] for n in names for f in factors
                if runs[n]["probe"].get(str(f)))
  planted = max(runs[n]["probe"][str(f)]["acc_planted"]["mean"] for n in names for f in factors
                if runs[n]["probe"].get(str(f)))
  if planted > control + 0.1:
    control_text = (f"With a different key planted, accuracy is at most {control:.2f}: what the models get right with "
                    "the key planted they copy from it, not guess.")
  else:
    best_gain = max(runs[n]["probe"][str(f)]["gain"]["mean"] for n in names for f in factors
                    if runs[n]["probe"].get(str(f)))
    control_text = (f"With a different key planted, accuracy is at most {control:.2f}, and no variant copies the "
                    f"planted key much better (best {planted:.2f}): these models have not learned to retrieve it "
                    f"(no induction/copy mechanism at this scale), and the largest gain, {best_gain:+.3f} nats, is at "
                    "most a faint in-context boost of the key's tokens, so the probe cannot tell the variants apart "
                    "here. (The test suite checks that the probe does detect retrieval: a perfect induction head "
                    "scores accuracy 1 with the key planted and 0 without.)")
  probe_cmp = []
  for p, d in cmp.items():
    for f in factors:
      if d["probe"].get(str(f)):
        probe_cmp.append(f"{POSITION_LABELS[p]} {f}x {_fmt_pm(d['probe'][str(f)]['gain'], '+.3f')} "
                         f"({verdict(d['probe'][str(f)]['gain'], better='higher')})")
  out.append(
      f"**Retrieval probe.** Top-1 accuracy copying a {report['study']['probe_key_len']}-token random key planted "
      f"{report['study']['probe_key_offset']} tokens into the context (gain = log-probability over the control, "
      f"nats/token): {'; '.join(lines)}. {control_text} SSMax - softmax in gain: "
      + ("; ".join(probe_cmp) if probe_cmp else "no pair was run") + ".")

  scales = {n: r["ssmax_scale_layer_means"] for n, r in runs.items() if r.get("ssmax_scale_layer_means")}
  if scales:
    text = "; ".join(f"{name_of(n)}: " + ", ".join(f"{v:.2f}" for v in s) for n, s in scales.items())
    out.append(
        f"**Learned SSMax scales.** Mean s_h per layer (initialised to 1; the logits are multiplied by s_h log n_i, "
        f"and log {T} = {math.log(T):.2f} at the end of a training window): {text}. A scale s gives query i an "
        f"inverse temperature s log(i+1): growing with context, as Nakanishi 2025 designs it.")

  out.append(
      f"**Scale and caveats.** Each variant was trained once, with one seed, for {report['steps']} steps of "
      f"{report['train_shape']} tokens on a {report['config']['d_model']}-wide, {report['config']['num_layers']}-layer "
      f"model; standard errors cover the choice of validation windows and probe trials only, not seed-to-seed "
      "variation, which at this size is often a few hundredths of a nat. Nakanishi 2025 trains 162M-parameter "
      "models on far longer contexts; effects that need long training or long contexts may not show here, and an "
      "absent effect at this scale is not evidence against the paper's.")
  return out


def markdown(report: dict) -> str:
  """report.md: set-up, headline and comparison tables, figures, the discussion, and how each number was obtained."""
  cfg, s, T = report["config"], report["study"], report["train_length"]
  lines = [
      f"# SSMax x NoPE: {report['name']}", "",
      f"One GPT-2-style decoder (d_model {cfg['d_model']}, {cfg['num_layers']} layers, {cfg['num_heads']} heads, GELU "
      f"MLP {cfg['d_ff']}, LayerNorm, biases, tied embeddings, vocab {cfg['vocab_size']}) trained once per variant "
      f"for {report['steps']} steps of {report['train_shape']} tokens on the same data in the same order (data seed "
      f"{cfg['data_seed']}, train seed {cfg['seed']}; the training-batch fingerprint is "
      f"{'identical' if report['data_order_identical'] else 'NOT identical'} across runs). Only the attention "
      "scoring and the positions differ:", "",
      "- **softmax** vs **SSMax** (Scalable-Softmax, Nakanishi 2025, arXiv 2501.19399): the logits of query i are "
      "multiplied by s_h · log n_i, with n_i = i + 1 the number of keys the causal mask lets it see and s_h learned "
      "per head (initialised to 1).",
      "- **learned** absolute positions (GPT-2), **NoPE** (no positional signal: Haviv et al. 2022, Kazemnejad et "
      "al. 2023) or **RoPE** (Su et al. 2021, θ = 10⁴).", "",
      f"Every model is built for T = {T} tokens. NoPE and RoPE models have no position table, so they are rebuilt "
      f"for {report['eval_length']} tokens ({s['eval_factor']}x) and load the same trained weights; a learned table "
      f"has exactly {T} rows and cannot represent a later position, so learned models are evaluated up to 1x only.",
      "",
      markdown_table(header(report), headline_rows(report)), "",
      f"Loss per position: mean NLL over {report['position_windows']} validation windows of {report['eval_length']} "
      f"tokens (learned: their first {T} tokens). Probe: top-1 accuracy and log-probability gain (planted - control) "
      f"on the repeated key, {s['probe_trials']} trials per length; lengths "
      f"{', '.join(str(f * T) for f in s['probe_factors'])}.",
      "", "SSMax - softmax, paired over the same windows and probe trials (± standard error):", "",
      markdown_table(comparison_header(report), comparison_rows(report)), "",
      f"Context past T: loss over positions [{T}, {report['eval_length']}) of the same windows, read whole (NoPE and "
      f"RoPE only) and with the context restarted every {T} tokens (every variant; no position past the trained "
      "range). A negative difference means the model profits from context beyond its training length.", "",
      markdown_table(("variant", "whole window", f"restarted every {T}", "difference (± s.e.)"),
                     context_rows(report)), "",
      "![validation loss](loss_curves.png)", "", "![loss per position](position_loss.png)", "",
      "![retrieval probe](probe.png)", "",
  ]
  methods = [
      "- Validation loss: the training loop's evaluation on its fixed validation batches of T tokens (curves from "
      "metrics.jsonl, the table from the final evaluation).",
      f"- Loss per position: {report['position_windows']} disjoint windows of {report['eval_length']} + 1 validation "
      "tokens spread evenly over the validation split (the same for every variant); each position's NLL averaged over "
      "the windows, and segment means per window for the paired differences. One jitted forward pass per model at "
      f"a fixed [{s['eval_batch']}, length] shape; shorter sequences are right-padded, which a causal model ignores.",
      f"- Retrieval probe: for each length L = f x T, {s['probe_trials']} stretches of validation text of L + 1 tokens "
      f"at seeded random offsets; a key of {s['probe_key_len']} distinct tokens, drawn from the {s['probe_pool']} "
      "most frequent training pieces minus the control symbols and minus every token of that stretch, replaces the "
      f"tokens at offset {s['probe_key_offset']} and the last {s['probe_key_len']} tokens. The model reads the "
      f"sequence once (teacher forcing) and is scored on key tokens 2..{s['probe_key_len']} of the repeat (its first "
      "token is the cue). The control plants a second, disjoint random key at the offset and keeps the same repeat. "
      "Gain = mean log p(key token) planted - control, per trial; accuracy = argmax equals the key token.",
      "- Context restarted every T: the same windows cut into blocks of T tokens, each scored as its own sequence "
      "(its first token has no context), with a length-T scorer.",
      "- Paired differences: per window (loss) or per trial (probe), SSMax minus softmax at the same positions, mean "
      "± standard error.",
      "- Data order: sha256 of the first training batches each run's config yields through "
      "`pipeline.make_train_iterator`, the function the training loop uses.",
      "- Initial weights: the same seed for every run. SSMax's s_h starts at 1 and draws no randomness, and neither "
      "NoPE nor RoPE has position parameters, so the NoPE and RoPE runs, softmax and SSMax alike, start from "
      "identical weights (checked in tests/experiments/test_ssmax_nope.py); the learned-position runs draw their "
      "table from the same random stream first, so their other weights are a different draw of the same "
      "distribution.",
  ]
  return report_markdown(lines, discussion(report), methods, report, report["runs"])


def write_report(report: dict, out_dir: str | Path) -> None:
  """report.md and the figures (`FIGURES`) of a report (report.json's contents) in `out_dir`."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  runs, T, factors = report["runs"], report["train_length"], report["study"]["probe_factors"]
  title = f"SSMax x NoPE ({report['name']})"
  plot_losses(runs, out_dir / "loss_curves.png", title)
  plot_position_loss(runs, T, report["eval_length"], report["unigram_val_loss"], out_dir / "position_loss.png", title)
  plot_probe(runs, factors, T, out_dir / "probe.png", title)
  (out_dir / "report.md").write_text(markdown(report))


if __name__ == "__main__":
  report_cli(write_report, "ssmax_nope")
