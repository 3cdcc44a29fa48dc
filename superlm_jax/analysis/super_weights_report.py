"""The super-weight study's report: a JSON-able dict, a markdown page and a PNG of the per-layer activation maxima
(the plot in which Yu et al. 2024, fig. 3, see the super activation as a spike)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from superlm_jax.analysis.super_weights import Analysis, SuperWeight
from superlm_jax.experiments.common import jsonable, markdown_table

PAPER = ('Yu et al. 2024, "The Super Weight in Large Language Models", arXiv 2411.07191')
_ACTIVATION_KEYS = ("in_max", "in_median", "out_max", "out_median", "ratio", "share", "row", "out_channel",
                    "paper_row", "weight", "out_value", "out_token")


def _weight_entry(w: SuperWeight, tokens: np.ndarray, token_piece: Callable[[int], str] | None) -> dict:
  window, position = divmod(int(w.token), tokens.shape[1])
  token_id = int(tokens[window, position])
  entry = dataclasses.asdict(w)
  entry.update(window=window, position=position, token_id=token_id,
               token_piece=token_piece(token_id) if token_piece else None)
  return entry


def build_report(analysis: Analysis, *, detect_tokens, eval_batches, source: dict[str, Any],
                 token_piece: Callable[[int], str] | None = None) -> dict[str, Any]:
  """The JSON report. `source` describes the model (checkpoint, step, name, ...); `token_piece` maps a token id
  to its text for the super activation's token."""
  d = analysis.detection
  tokens = np.asarray(detect_tokens)
  sites = [{"name": s.name, "label": s.label, "layer": s.layer, "kind": s.kind,
            **{k: d.passes[0][s.name][k] for k in _ACTIVATION_KEYS}} for s in d.sites]
  passes = [{s.name: {k: p[s.name][k] for k in ("in_max", "out_max", "ratio", "share")} for s in d.sites}
            for p in d.passes]
  eval_tokens = int(sum(np.asarray(b["targets"]).size for b in eval_batches))
  return jsonable({  # strict JSON: non-finite floats as None
      "paper": PAPER,
      "source": source,
      "settings": {"threshold": d.threshold, "min_share": d.min_share, "stop_fraction": d.stop_fraction,
                   "max_iters": d.max_iters, "control_count": analysis.ablation["control_count"],
                   "detect_shape": list(tokens.shape), "eval_batches": len(eval_batches), "eval_tokens": eval_tokens},
      "routed_experts_skipped_layers": analysis.routed_expert_layers,
      "sites": sites,
      "passes": passes,
      "super_weights": [_weight_entry(w, tokens, token_piece) for w in d.super_weights],
      "ablated": [_weight_entry(w, tokens, token_piece) for w in d.ablated],
      "ablated_are_super_weights": bool(d.super_weights),
      "ablation": analysis.ablation,
      "quantization": analysis.quantization,
      "wall_time_s": analysis.wall_time_s,
  })


# ----------------------------------------------------------------------------------------------- plot


def plot_activations(report: dict, path: Path) -> None:
  """Max |input| and max |output| of every down-projection (log scale), original model, with the output
  spike threshold, and the same maxima after the found super weights were removed."""
  from matplotlib.figure import Figure  # No pyplot: no global state, no display needed.
  sites = report["sites"]
  labels = [s["label"] for s in sites]
  x = np.arange(len(sites))
  after = report["passes"][-1] if report["super_weights"] else None
  fig = Figure(figsize=(max(7.0, 0.5 * len(sites) + 4), 4.4), layout="constrained")
  axes = fig.subplots(1, 2)
  for ax, side, title, var in ((axes[0], "in", "down-proj input (hidden activation)", "x"),
                               (axes[1], "out", "down-proj output", "y")):
    ax.plot(x, [s[f"{side}_max"] for s in sites], "o-", color="tab:blue", label=f"max |{var}|")
    ax.plot(x, [s[f"{side}_median"] for s in sites], "s--", color="gray", markersize=4, label=f"median |{var}|")
    if side == "out":
      ax.plot(x, [report["settings"]["threshold"] * s["out_median"] for s in sites], "_", color="tab:red",
              markersize=16, markeredgewidth=2,
              label=f"{report['settings']['threshold']:g} x median (spike threshold)")
    if after is not None:
      ax.plot(x, [after[s["name"]][f"{side}_max"] for s in sites], "o", color="tab:orange",
              markerfacecolor="none", markersize=9, label=f"max |{var}|, super weights zeroed")
    ax.set_yscale("log")
    ax.set_xticks(x, labels, rotation=45 if len(sites) > 8 else 0)
    ax.set_title(title)
    ax.set_xlabel("MLP (block)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Super-activation search: {report['source'].get('name', 'model')}")
  fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------- markdown


def _g(x, digits=3) -> str:
  if x is None:
    return "n/a"
  return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def _delta(x: float) -> str:
  """A signed NLL difference that stays readable when it is tiny."""
  return f"{x:+.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:+.1e}"


def _where(w: dict) -> str:
  piece = f" {w['token_piece']!r}" if w.get("token_piece") is not None else ""
  return f"window {w['window']}, position {w['position']} (token {w['token_id']}{piece})"


def verdict(report: dict) -> str:
  s = report["settings"]
  if report["super_weights"]:
    ws = report["super_weights"]
    first = ws[0]
    return (f"**{len(ws)} super weight(s) found.** The first, `{first['site']}.down[{first['row']}, "
            f"{first['col']}]` = {_g(first['value'])}, makes a super activation of {_g(first['super_activation'])} "
            f"({_g(first['ratio'])}x the median |output| of its MLP) at {_where(first)}.")
  top = max(report["sites"], key=lambda site: site["ratio"])
  why = ("no down-projection output reaches the spike threshold" if top["ratio"] < s["threshold"] else
         "the spikes that pass the threshold are not made by one weight (share below min_share)")
  return (f"**No super weight found**: {why} (largest: {_g(top['ratio'])}x the median at {top['label']}, "
          f"threshold {s['threshold']:g}x, min share {s['min_share']:g}). The ablations below use the strongest "
          f"candidate, `{report['ablated'][0]['site']}.down[{report['ablated'][0]['row']}, "
          f"{report['ablated'][0]['col']}]`, as a control of what removing one ordinary weight does.")


def reading(report: dict) -> str:
  """One paragraph that says what the perplexity table shows."""
  c = report["ablation"]["conditions"]
  n = report["settings"]["control_count"]
  base = c["original"]["nll"]
  move = lambda name: c[name]["nll"] - base
  if report["ablated_are_super_weights"]:
    text = (f"Zeroing the {len(report['super_weights'])} super weight(s) moves the validation NLL by "
            f"{_delta(move('zero_super'))} nats/token (perplexity x{math.exp(move('zero_super')):.3g}); zeroing the "
            f"same number of the largest other down-projection weights moves it by "
            f"{_delta(move('zero_largest_same_count'))}, the {n} largest by {_delta(move(f'zero_largest_{n}'))}.")
    if "zero_super_restore_activation" in c and move("zero_super"):
      undone = 1 - move("zero_super_restore_activation") / move("zero_super")
      text += (f" Restoring the super activation alone undoes {100 * undone:.0f}% of the move from zeroing "
               f"the weight.")
    return text
  top = max(report["sites"], key=lambda site: site["ratio"])
  ordinary = abs(move("zero_super")) <= max(abs(move(f"zero_largest_{n}")), 1e-3)
  return (f"Zeroing the candidate moves the validation NLL by {_delta(move('zero_super'))} nats/token, against "
          f"{_delta(move(f'zero_largest_{n}'))} for the {n} largest other down-projection weights: "
          + ("it is an ordinary weight, whose removal matters no more than that of the largest others. "
             if ordinary else "it matters more than the largest others, but without a massive activation. ")
          + f"The largest down-projection output is {_g(top['ratio'])}x its MLP's median |output|, an ordinary "
          "outlier; the massive activations "
          "behind super weights are orders of magnitude larger than the rest (up to ~100,000x in LLMs, Sun et al. "
          "2024). This is a negative result for this model, not evidence against the paper, whose super weights "
          "were found in billion-parameter models trained on trillions of tokens.")


_CONDITION_LABELS = {
    "original": "original",
    "zero_super": "super weight(s) zeroed",
    "zero_largest_same_count": "same number of largest other down-proj weights zeroed",
    "zero_super_restore_activation": "super weight(s) zeroed, super activation restored",
}


def condition_label(name: str, report: dict) -> str:
  label = _CONDITION_LABELS.get(name)
  if label is None and name.startswith("zero_largest_"):
    label = f"{name.rsplit('_', 1)[1]} largest other down-proj weights zeroed"
  if not report["ablated_are_super_weights"]:
    label = label.replace("super weight(s)", "candidate").replace("super activation", "its activation")
  return label


def markdown(report: dict, command: str | None = None) -> str:
  src, s = report["source"], report["settings"]
  ablation = report["ablation"]["conditions"]
  base = ablation["original"]["nll"]
  lines = [
      f"# Super weights: {src.get('name', 'model')}", "",
      f"Model: {src.get('description', '')}. Method: {PAPER}; see `superlm_jax/analysis/super_weights.py`.", "",
      verdict(report), "",
      "## Down-projection activations (original model, one forward pass)", "",
      f"Detection input: {s['detect_shape'][0]} windows of {s['detect_shape'][1]} tokens. For each MLP: the largest "
      "and median |input| (hidden activation) and |output|; ratio = max / median |output|; at the token and channel "
      "j of the largest |output|, the weight down[k, j] with the largest |x_k · w_kj| and its share of that output "
      "(bias excluded). \"paper k\" is the paper's rule, the input channel with the largest |x|.", "",
      markdown_table(("MLP", "max \\|in\\|", "median \\|in\\|", "max \\|out\\|", "median \\|out\\|", "ratio",
                      "k -> j", "paper k", "w[k, j]", "share"),
                     [(f"`{x['name']}`", _g(x["in_max"]), _g(x["in_median"]), _g(x["out_max"]), _g(x["out_median"]),
                       _g(x["ratio"]), f"{x['row']} -> {x['out_channel']}", str(x["paper_row"]), _g(x["weight"]),
                       _g(x["share"], 2)) for x in report["sites"]]), "",
      "![per-layer max activations](activations.png)", "",
  ]
  if report["super_weights"]:
    lines += ["## Super weights (in the order the iteration removed them)", "",
              markdown_table(("#", "MLP", "row k (input ch.)", "col j (output ch.)", "weight", "super activation",
                              "input activation", "ratio", "share", "where", "pass"),
                             [(str(i), f"`{w['site']}`", str(w["row"]), str(w["col"]), _g(w["value"]),
                               _g(w["super_activation"]), _g(w["input_activation"]), _g(w["ratio"]),
                               _g(w["share"], 2), _where(w), str(w["iteration"]))
                              for i, w in enumerate(report["super_weights"])]), ""]
  lines += [
      "## Validation perplexity", "",
      f"{s['eval_batches']} validation batches, {s['eval_tokens']:,} tokens.", "",
      markdown_table(("condition", "weights zeroed", "NLL (nats/token)", "perplexity", "Δ NLL"),
                     [(condition_label(name, report), str(c.get("zeroed", 0)), f"{c['nll']:.4f}",
                       _g(c["perplexity"], 4), _delta(c['nll'] - base)) for name, c in ablation.items()]), "",
  ]
  lines += [reading(report), ""]
  control = report["ablation"]["controls"][f"largest_{s['control_count']}"]
  lines.append(f"Controls: the largest-|w| down-projection weights of all searched MLPs other than the ablated "
               f"one(s) (|w| from {_g(control['abs_min'])} to {_g(control['abs_max'])} for the "
               f"{s['control_count']}).")
  restore = ablation.get("zero_super_restore_activation")
  if restore is not None:
    lines.append(f"Restore: the pruned model's down-projection output at the super activation's channel is set "
                 f"back to the original model's value wherever that value is an outlier (|y| ≥ min(threshold × "
                 f"median, half the peak)), {100 * restore['restored_token_fraction']:.2f}% of the tokens; "
                 "everywhere else the pruned model runs as is.")
  lines.append("")
  q = report.get("quantization")
  if q:
    lines += [
        "## int8 round-to-nearest of the MLP weights", "",
        "Per-tensor symmetric absmax int8 (scale = max |w| / 127) of every MLP weight matrix (up, gate, down; "
        "routed experts one tensor per expert); \"held out\": the ablated weight(s) excluded from the scale and "
        "restored in full precision after dequantization (paper sec. 4).", "",
        markdown_table(("weights", "NLL (nats/token)", "perplexity", "Δ NLL", "weight MSE",
                        "MSE, tensors with a held-out weight"),
                       [(name.replace("_", " "), f"{c['nll']:.4f}", _g(c["perplexity"], 4), _delta(c['nll'] - base),
                         _g(c.get("mse")), _g(c.get("mse_held_tensors"))) for name, c in q.items()]), "",
    ]
  lines += ["## Notes", ""]
  if report["routed_experts_skipped_layers"]:
    lines.append(f"- Routed experts (MoE blocks {report['routed_experts_skipped_layers']}) were not searched: "
                 "their weights are stacked inside the MoE layer, with no per-expert MLP to probe. Dense first-k "
                 "blocks and shared experts were.")
  lines += [
      f"- Spike test: max |output| ≥ {s['threshold']:g} × median |output| of the same MLP, and the single weight "
      f"makes ≥ {s['min_share']:g} of that output value; after a super weight is removed, later spikes must reach "
      f"{s['stop_fraction']:g} × the first super activation (the paper iterates \"until the large maximum "
      "activations are greatly suppressed\").",
      "- Coordinates are in our layout, down[row k = hidden input channel, col j = output channel]. In a Hugging "
      "Face checkpoint that is `mlp.down_proj.weight[j, k]` (Llama, DeepSeek: nn.Linear, [out, in]) or "
      "`mlp.c_proj.weight[k, j]` (GPT-2: Conv1D, [in, out]).",
      "- Paper, for scale: in Llama-7B the super weight is `layers[2].mlp.down_proj.weight[3968, 7003]`; pruning "
      "it raises perplexity by about three orders of magnitude, while pruning the other largest weights hardly "
      "matters.",
      f"- Wall time: {report['wall_time_s']:.1f} s.",
  ]
  if command:
    lines += ["", "Reproduce:", "", "```bash", command, "```"]
  return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path, command: str | None = None) -> Path:
  """report.json, report.md and activations.png in `out_dir`; returns the markdown path."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
  plot_activations(report, out_dir / "activations.png")
  path = out_dir / "report.md"
  path.write_text(markdown(report, command))
  return path
