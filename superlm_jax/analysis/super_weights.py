"""Super weights (Yu et al. 2024, "The Super Weight in Large Language Models", arXiv 2411.07191).

A handful of scalar weights in an early MLP down-projection produce a "super activation": one hidden channel of
the down-projection's output that is orders of magnitude larger than everything else, at a few tokens. Zeroing
that single weight destroys the model (Llama-7B, WikiText-2 perplexity 5.68 -> 763), while zeroing the
thousands of next-largest weights barely matters; putting the super activation back recovers most of the loss
(sec. 3.2, table 2). Holding the super weight out of round-to-nearest quantization lets a per-tensor scale
ignore it, which makes naive quantization much better (sec. 4).

What this module does, on any `Transformer` (trained here or converted from Hugging Face) given token batches:
  detect      one forward pass that captures every MLP down-projection's input X [tokens, hidden] and output
              Y [tokens, dim] (a `probes.DownProjProbe` in place of each MLP of a copy of the model); in the
              site whose output has the most extreme outlier, the super weight is down[k, j] (our layout:
              [hidden, dim], row = input channel k, column = output channel j) with j, t = the channel and token
              of the largest |Y| and k = argmax_k |X[t, k] * down[k, j]|, the single product that makes the spike.
              The paper's rule (k = the channel of the largest |X|) is reported next to it. The weight is then
              zeroed and the pass repeated (the paper's iteration) until no spike is left.
  ablate      validation NLL of: the original; super weight(s) zeroed; the same number of the largest OTHER
              down-projection weights zeroed, and the 100 largest (controls); super weight(s) zeroed with the
              super activation written back by a `DownProjProbe` override.
  quantize    per-tensor symmetric absmax int8 round-to-nearest of all MLP weights (up/gate/down), naive vs
              with the super weight(s) held out of the scale and restored after dequantization.

Sites (`sites.mlp_sites`): every `layers.mlp.MLP` of a loop-layout model, i.e. GPT-2/Llama dense blocks,
DeepSeek's first-k dense blocks and the shared experts of MoE blocks. Routed experts (stacked weights inside
`layers.moe.MoE`) are no site and are not searched for super weights (they are quantized, per expert, by the
quantization recipe). Validation NLL is the one evaluator's, `training.evaluate`.

A "spike" here is a site whose max |Y| is at least `threshold` (default 100) times its median |Y|: the massive
activations of LLMs are orders of magnitude larger than the rest (Sun et al. 2024, arXiv 2402.17762: "e.g.,
100,000 times larger"), while an ordinary trained MLP's largest output is tens of times its median. The weight
found must also make at least `min_share` of that output value by itself, otherwise the spike is many weights'
doing and there is no single super weight to remove.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from superlm_jax.analysis.probes import down_proj_activations, merge_with_overrides
from superlm_jax.analysis.sites import (Site, largest_down_weights, mlp_sites, module_at, routed_expert_layers,
                                        sites_by_name, zero_weights)
from superlm_jax.data import pipeline
from superlm_jax.errors import UserError
from superlm_jax.layers.moe import MoE
from superlm_jax.training.evaluate import Average, make_token_nll, mean_nll


# ----------------------------------------------------------------------------------------------- statistics


def site_summary(x: jax.Array, y: jax.Array, down: jax.Array) -> dict[str, jax.Array]:
  """Outlier statistics of one down-projection: input x [..., hidden], output y [..., dim], down [hidden, dim].

  Returns scalars: the largest |x| (and its flat token index and channel), the median |x|; the same for y; and
  at the token t and channel j of the largest |y| the weight row k = argmax_k |x[t, k] * down[k, j]|, that
  weight, its input activation and product ("contribution"), and the sum of all products (y[t, j] - bias).
  """
  hidden, dim = down.shape
  x = x.reshape(-1, hidden).astype(jnp.float32)
  y = y.reshape(-1, dim).astype(jnp.float32)
  down = down.astype(jnp.float32)
  ax, ay = jnp.abs(x), jnp.abs(y)
  in_flat, out_flat = jnp.argmax(ax), jnp.argmax(ay)
  t, j = out_flat // dim, out_flat % dim
  products = x[t] * down[:, j]
  k = jnp.argmax(jnp.abs(products))
  return {
      "in_max": ax.reshape(-1)[in_flat], "in_token": in_flat // hidden, "in_channel": in_flat % hidden,
      "in_median": jnp.median(ax),
      "out_max": ay.reshape(-1)[out_flat], "out_value": y[t, j], "out_token": t, "out_channel": j,
      "out_median": jnp.median(ay),
      "row": k, "weight": down[k, j], "input_at_row": x[t, k], "contribution": products[k],
      "contribution_sum": jnp.sum(products),
      # The paper's candidate: the input channel with the largest |x| anywhere.
      "paper_row": in_flat % hidden,
  }


def make_stats_fn(graphdef, sites: Sequence[Site]):
  """A jitted (params, rest, tokens) -> {site name: site_summary} from one forward pass with every site probed."""

  def stats(params, rest, tokens):
    model = nnx.merge(graphdef, params, rest)
    activations = down_proj_activations(model, [site.path for site in sites], tokens)
    return {site.name: site_summary(*activations[site.path], module_at(model, site.path).down[...])
            for site in sites}

  return jax.jit(stats)


def _host(summary: dict[str, jax.Array]) -> dict[str, float | int]:
  return {k: (int(v) if np.issubdtype(np.asarray(v).dtype, np.integer) else float(v))
          for k, v in jax.device_get(summary).items()}


# ----------------------------------------------------------------------------------------------- detection


@dataclasses.dataclass
class SuperWeight:
  """down[row, col] of `site`: row = the input (hidden) channel, col = the output (model) channel."""
  site: str
  layer: int
  kind: str
  row: int
  col: int
  value: float  # the weight
  super_activation: float  # the down-projection output at (token, col), bias included
  input_activation: float  # the down-projection input at (token, row)
  token: int  # flat index of the token in the detection batch
  ratio: float  # |super activation| / median |output| of the site
  share: float  # contribution of this one weight / (output - bias) at that token
  out_median: float  # median |output| of the site, for the restore level
  paper_row: int  # the paper's rule: the input channel with the largest |input|
  iteration: int  # detection pass in which it was found (0 = the original model)
  passed: bool = True  # False for the strongest below-threshold candidate (see `DetectionResult.ablated`)

  @property
  def coordinate(self) -> tuple[str, int, int]:
    return (self.site, self.row, self.col)


@dataclasses.dataclass
class DetectionResult:
  sites: list[Site]
  super_weights: list[SuperWeight]  # found, in the order the iteration removed them
  candidate: SuperWeight | None  # the strongest candidate of the original model, whether or not it passed
  passes: list[dict[str, dict]]  # per detection pass: {site name: host site_summary (+ ratio, share)}
  threshold: float
  min_share: float
  stop_fraction: float
  max_iters: int

  @property
  def ablated(self) -> list[SuperWeight]:
    """What the ablations remove: the super weights, or, if none passed, the strongest candidate (labelled)."""
    if self.super_weights:
      return self.super_weights
    return [self.candidate] if self.candidate is not None else []


def _ratio(s: dict) -> float:
  return s["out_max"] / max(s["out_median"], 1e-30)


def _share(s: dict) -> float:
  total = s["contribution_sum"]
  return s["contribution"] / total if total != 0 else 0.0


def _to_super_weight(site: Site, s: dict, iteration: int, passed: bool) -> SuperWeight:
  return SuperWeight(site=site.name, layer=site.layer, kind=site.kind, row=s["row"], col=s["out_channel"],
                     value=s["weight"], super_activation=s["out_value"], input_activation=s["input_at_row"],
                     token=s["out_token"], ratio=_ratio(s), share=_share(s), out_median=s["out_median"],
                     paper_row=s["paper_row"], iteration=iteration, passed=passed)


def choose_super_weight(stats: dict[str, dict], sites: Sequence[Site], *, threshold: float, min_share: float,
                        min_activation: float = 0.0) -> tuple[Site, dict] | None:
  """The site with the largest output spike among those that pass the tests (pure, on host summaries): ratio
  >= threshold, share >= min_share and |output| >= min_activation."""
  passing = [(site, stats[site.name]) for site in sites
             if _ratio(stats[site.name]) >= threshold and _share(stats[site.name]) >= min_share
             and stats[site.name]["out_max"] >= min_activation]
  return max(passing, key=lambda item: _ratio(item[1]), default=None)


def detect_super_weights(model: nnx.Module, tokens: jax.Array, *, threshold: float = 100.0,
                         min_share: float = 0.5, max_iters: int = 5, stop_fraction: float = 0.1
                         ) -> DetectionResult:
  """Finds super weights by the paper's iteration: capture, pick the spike's weight, zero it, repeat.

  `tokens` [batch, seq] is the detection input (one batch of text is enough: super activations appear for any
  prompt). At most `max_iters` weights are removed; one more pass then records the activations without them.
  The paper repeats "until the large maximum activations are greatly suppressed": once a super weight is
  removed, a later spike counts only if it is at least `stop_fraction` of the first super activation. (The
  removed weight's input channel usually stays huge, and ordinary weights of its row then still make outputs
  that are outliers against a small median without being super weights.)
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sites = mlp_sites(model)
  if not sites:
    raise ValueError("the model has no MLP (down-projection) to search")
  stats_fn = make_stats_fn(graphdef, sites)
  found: list[SuperWeight] = []
  passes: list[dict[str, dict]] = []
  for iteration in range(max_iters + 1):
    stats = {name: _host(s) for name, s in stats_fn(params, rest, jnp.asarray(tokens)).items()}
    for s in stats.values():
      s["ratio"], s["share"] = _ratio(s), _share(s)
    passes.append(stats)
    if iteration == max_iters:
      break
    min_activation = stop_fraction * abs(found[0].super_activation) if found else 0.0
    pick = choose_super_weight(stats, sites, threshold=threshold, min_share=min_share,
                               min_activation=min_activation)
    if pick is None:
      break
    found.append(_to_super_weight(*pick, iteration=iteration, passed=True))
    params = zero_weights(params, sites, [found[-1].coordinate])
  first = passes[0]
  strongest = max(sites, key=lambda site: first[site.name]["ratio"])
  candidate = (found[0] if found else
               _to_super_weight(strongest, first[strongest.name], iteration=0, passed=False))
  return DetectionResult(sites=sites, super_weights=found, candidate=candidate, passes=passes,
                         threshold=threshold, min_share=min_share, stop_fraction=stop_fraction,
                         max_iters=max_iters)


def text_windows(data_dir, max_length: int, count: int, split: str = "train") -> np.ndarray:
  """`count` windows of `max_length` tokens spread evenly over a prepared data dir's `split`.bin: int32
  [count, max_length], the detection input. (The CLI detects on training text and scores on validation text,
  so the weights are not picked on the data that measures their removal.)"""
  meta = pipeline.load_meta(data_dir)
  path = pathlib.Path(data_dir) / f"{split}.bin"
  source = pipeline.TokenWindows(path, max_length, max_length, meta["dtype"])
  if len(source) == 0:
    raise UserError(f"{path} has fewer than {max_length + 1} tokens")
  indices = np.linspace(0, len(source) - 1, min(count, len(source))).round().astype(int)
  return np.stack([source[int(i)]["inputs"] for i in indices])


# ----------------------------------------------------------------------------------------------- evaluation


def make_nll_fn(graphdef):
  """The one evaluator (`training.evaluate.make_token_nll`) on the model with overrides probed in: a jitted
  (params, (model state, {site path: probes.Override}), batch) -> per-token NLL. Share it between studies of one
  model to compile once."""
  return make_token_nll(graphdef, merge=merge_with_overrides)


def validation_nll(nll_fn, params, rest, batches: Sequence[dict], overrides_per_batch: Sequence[dict] | None = None
                   ) -> float:
  """Mean validation NLL (nats/token) over `batches`, batch i with `overrides_per_batch[i]` written in."""
  if overrides_per_batch is None:
    return mean_nll(nll_fn, params, (rest, {}), batches).mean
  total = Average()
  for batch, overrides in zip(batches, overrides_per_batch, strict=True):
    total = total.merge(mean_nll(nll_fn, params, (rest, overrides), [batch]))
  return total.mean


def restore_overrides(graphdef, params, rest, sites: Sequence[Site], weights: Sequence[SuperWeight],
                      batches: Sequence[dict], threshold: float) -> tuple[list[dict], float]:
  """Per-batch overrides that write the ORIGINAL model's super activations back (sec. 3.2), and the fraction
  of tokens restored.

  A super activation is where the original output channel is an outlier: |y| >= restore level, the lower of
  `threshold` x the site's median |y| and half the detected peak (so that a below-threshold candidate still has
  its largest values restored). Only those tokens are written; everywhere else the pruned model runs as is,
  so what is measured is the super activation's role, not a full undo of the pruning.
  """
  by_name = sites_by_name(sites)
  channels: dict[str, list[int]] = {}
  levels: dict[tuple[str, int], float] = {}
  for w in weights:
    if w.col not in channels.setdefault(w.site, []):
      channels[w.site].append(w.col)
    level = min(threshold * w.out_median, 0.5 * abs(w.super_activation))
    levels[(w.site, w.col)] = min(levels.get((w.site, w.col), math.inf), level)

  @jax.jit
  def channel_fn(params, rest, tokens):  # {site name: original down-proj output [batch, seq, n] at its channels}
    outputs = down_proj_activations(nnx.merge(graphdef, params, rest), [by_name[n].path for n in channels], tokens)
    return {name: outputs[by_name[name].path][1][..., jnp.asarray(cols)] for name, cols in channels.items()}

  overrides, restored, total = [], 0, 0
  for batch in batches:
    values = channel_fn(params, rest, jnp.asarray(batch["inputs"]))
    per_batch = {}
    for name, cols in channels.items():
      level = jnp.asarray([levels[(name, c)] for c in cols], jnp.float32)
      mask = jnp.abs(values[name].astype(jnp.float32)) >= level
      restored += int(mask.sum())
      total += mask.size
      per_batch[by_name[name].path] = (jnp.asarray(cols, jnp.int32), mask, values[name])
    overrides.append(per_batch)
  return overrides, restored / max(total, 1)


def ablation_study(model: nnx.Module, batches: Sequence[dict], weights: Sequence[SuperWeight], *,
                   threshold: float = 100.0, control_count: int = 100, nll_fn=None) -> dict[str, Any]:
  """Validation NLL (nats/token) and perplexity of the paper's ablations (table 2) for `weights`.

  Conditions: original; super weight(s) zeroed; the same number of the largest other down-projection weights
  zeroed; the `control_count` largest other ones zeroed; super weight(s) zeroed with the super activation
  restored. Returns {"conditions": {name: {"nll", "perplexity", ...}}, "controls": ...}. `nll_fn`: `make_nll_fn`
  of this model's graphdef, if already made.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sites = mlp_sites(model)
  nll_fn = nll_fn or make_nll_fn(graphdef)
  coords = [w.coordinate for w in weights]
  same = largest_down_weights(params, sites, len(coords), exclude=coords) if coords else []
  top = largest_down_weights(params, sites, control_count, exclude=coords)

  def entry(nll: float, **extra) -> dict:
    return {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), **extra}

  conditions = {"original": entry(validation_nll(nll_fn, params, rest, batches))}
  if coords:
    pruned = zero_weights(params, sites, coords)
    conditions["zero_super"] = entry(validation_nll(nll_fn, pruned, rest, batches), zeroed=len(coords))
    conditions["zero_largest_same_count"] = entry(
        validation_nll(nll_fn, zero_weights(params, sites, [w[:3] for w in same]), rest, batches), zeroed=len(same))
  conditions[f"zero_largest_{control_count}"] = entry(
      validation_nll(nll_fn, zero_weights(params, sites, [w[:3] for w in top]), rest, batches), zeroed=len(top))
  if coords:
    overrides, fraction = restore_overrides(graphdef, params, rest, sites, weights, batches, threshold)
    conditions["zero_super_restore_activation"] = entry(
        validation_nll(nll_fn, pruned, rest, batches, overrides), zeroed=len(coords), restored_token_fraction=fraction)
  magnitudes = lambda ws: [abs(w[3]) for w in ws]
  return {
      "conditions": conditions,
      "control_count": control_count,
      "controls": {
          "same_count": {"count": len(same), "abs_max": max(magnitudes(same), default=None),
                         "abs_min": min(magnitudes(same), default=None)},
          f"largest_{control_count}": {"count": len(top), "abs_max": max(magnitudes(top), default=None),
                                       "abs_min": min(magnitudes(top), default=None)},
      },
  }


# ----------------------------------------------------------------------------------------------- quantization


def quantize_int8(w: jax.Array, holdout: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-tensor symmetric absmax int8 round-to-nearest, dequantized: (w_hat, scale).

  scale = max |w| / 127 over the weights NOT in `holdout` (a boolean mask of w's shape); held-out weights are
  clipped like the rest when quantized, then written back in full precision (Yu et al. 2024, sec. 4: one super
  weight otherwise sets the scale and rounds every other weight of the tensor to a few levels).
  """
  w32 = w.astype(jnp.float32)
  keep = jnp.ones(w.shape, bool) if holdout is None else ~holdout
  absmax = jnp.max(jnp.where(keep, jnp.abs(w32), 0.0))
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  w_hat = jnp.clip(jnp.round(w32 / scale), -127, 127) * scale
  if holdout is not None:
    w_hat = jnp.where(holdout, w32, w_hat)
  return w_hat.astype(w.dtype), scale


_MLP_WEIGHTS = ("up", "gate", "down")
_EXPERT_WEIGHTS = ("w_up", "w_gate", "w_down")


def quantize_mlp_weights(model: nnx.Module, params: nnx.State, holdout: Sequence[SuperWeight] = ()
                         ) -> tuple[nnx.State, dict[str, Any]]:
  """A copy of `params` with every MLP weight matrix (up/gate/down of each MLP site, and of each routed expert,
  one tensor per expert) int8-quantized per tensor; `holdout` super weights keep full precision.

  Returns (params, {"tensors": n, "mse": mean squared weight error over all quantized weights,
  "mse_held_tensors": the same over the tensors holding a held-out weight}).
  """
  new = jax.tree.map(lambda a: a, params)
  held: dict[str, list[tuple[int, int]]] = {}
  for w in holdout:
    held.setdefault(w.site, []).append((w.row, w.col))
  sq_err, count, held_err, held_count, tensors = 0.0, 0, 0.0, 0, 0
  for site in mlp_sites(model):
    node = module_at(new, site.path)
    for name in _MLP_WEIGHTS:
      if name not in node:
        continue
      w = node[name][...]
      mask = None
      if name == "down" and site.name in held:
        rows, cols = zip(*held[site.name])
        mask = jnp.zeros(w.shape, bool).at[np.asarray(rows), np.asarray(cols)].set(True)
      w_hat, _ = quantize_int8(w, mask)
      err = float(jnp.sum((w_hat.astype(jnp.float32) - w.astype(jnp.float32)) ** 2))
      sq_err, count, tensors = sq_err + err, count + w.size, tensors + 1
      if mask is not None:
        held_err, held_count = held_err + err, held_count + w.size
      node[name].set_value(w_hat)
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, MoE):
      continue
    node = module_at(new, tuple(path))
    for name in _EXPERT_WEIGHTS:
      if name not in node:
        continue
      w = node[name][...]
      w_hat = jax.vmap(lambda e: quantize_int8(e)[0])(w)  # one tensor per expert
      sq_err += float(jnp.sum((w_hat.astype(jnp.float32) - w.astype(jnp.float32)) ** 2))
      count, tensors = count + w.size, tensors + w.shape[0]
      node[name].set_value(w_hat)
  return new, {"tensors": tensors, "mse": sq_err / max(count, 1),
               "mse_held_tensors": held_err / held_count if held_count else None}


def quantization_study(model: nnx.Module, batches: Sequence[dict], weights: Sequence[SuperWeight], *,
                       nll_fn=None, original_nll: float | None = None) -> dict[str, Any]:
  """Validation NLL/perplexity of the original model (`original_nll` if already measured), naive int8 MLP
  weights, and int8 with `weights` held out; plus the weight MSE of each quantized variant."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  nll_fn = nll_fn or make_nll_fn(graphdef)
  if original_nll is None:
    original_nll = validation_nll(nll_fn, params, rest, batches)
  out = {"original": {"nll": original_nll, "perplexity": math.exp(min(original_nll, 700.0))}}
  for name, holdout in (("int8_naive", ()), ("int8_holdout_super", tuple(weights))):
    quantized, info = quantize_mlp_weights(model, params, holdout)
    nll = validation_nll(nll_fn, quantized, rest, batches)
    out[name] = {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), **info}
  return out


@dataclasses.dataclass
class Analysis:
  """Everything `analyze` measured."""
  detection: DetectionResult
  ablation: dict[str, Any]
  quantization: dict[str, Any] | None
  routed_expert_layers: list[int]  # MoE blocks whose routed experts were not searched
  wall_time_s: float


def analyze(model: nnx.Module, detect_tokens: jax.Array, eval_batches: Sequence[dict], *, threshold: float = 100.0,
            min_share: float = 0.5, max_iters: int = 5, stop_fraction: float = 0.1, control_count: int = 100,
            quantize: bool = True) -> Analysis:
  """The whole study on an in-memory model: detection on `detect_tokens` [batch, seq], then the ablations and
  (if `quantize`) the int8 recipe on `eval_batches` ({"inputs", "targets"} [batch, seq] each). The ablations
  and the hold-out use the super weights found, or the strongest candidate if none passed
  (`detection.super_weights` is then empty and `candidate.passed` is False)."""
  start = time.perf_counter()
  detection = detect_super_weights(model, detect_tokens, threshold=threshold, min_share=min_share,
                                   max_iters=max_iters, stop_fraction=stop_fraction)
  nll_fn = make_nll_fn(nnx.split(model, nnx.Param, ...)[0])
  ablation = ablation_study(model, eval_batches, detection.ablated, threshold=threshold,
                            control_count=control_count, nll_fn=nll_fn)
  quantization = (quantization_study(model, eval_batches, detection.ablated, nll_fn=nll_fn,
                                     original_nll=ablation["conditions"]["original"]["nll"])
                  if quantize else None)
  return Analysis(detection=detection, ablation=ablation, quantization=quantization,
                  routed_expert_layers=routed_expert_layers(model), wall_time_s=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------- planting


def plant_super_weight(model: nnx.Module, site: Site, row: int, col: int, value: float, scale: float) -> None:
  """Test/demo helper: makes down[row, col] of `site` a super weight, in place.

  Hidden unit `row` is made to fire `scale` times harder on the same tokens (GELU: its up-projection column and
  bias times `scale`, so the pre-activation is scaled; SwiGLU: the linear `up` column times `scale`, the gate
  unchanged), and down[row, col] = `value` turns it into a massive activation at output channel `col`. Pick a
  `row` that fires on real text (e.g. the largest input channel, `site_summary`'s "paper_row") so the super
  activation appears where the model is evaluated.
  """
  mlp = module_at(model, site.path)
  mlp.down[...] = mlp.down[...].at[row, col].set(value)
  mlp.up[...] = mlp.up[...].at[:, row].multiply(scale)
  if mlp.activation != "swiglu" and mlp.up_bias is not None:
    mlp.up_bias[...] = mlp.up_bias[...].at[row].multiply(scale)
