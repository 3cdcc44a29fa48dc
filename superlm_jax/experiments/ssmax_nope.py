"""SSMax x NoPE (seeds 000/001): one GPT-2-style decoder trained once per attention scoring {softmax, SSMax} x
position scheme {learned, none (NoPE), RoPE}, then compared at the training length and beyond it.

  python -m superlm_jax.experiments.ssmax_nope --config=configs/ssmax_nope.py:tiny

Scalable-Softmax (Nakanishi 2025, arXiv 2501.19399) multiplies the logits of query i by s_h * log n_i, n_i the number
of keys the query sees. Its argument: with a plain softmax the largest attention weight shrinks as n grows
("attention fading"), so a model trained on short contexts attends too diffusely on long ones; scaling the logits
with log n keeps a key that stands out standing out at any n, which should help length generalisation and
retrieval of a key far back. NoPE (Haviv et al. 2022; Kazemnejad et al. 2023) drops positional encodings entirely:
a causal decoder infers order from the mask, comes close to learned positions in perplexity, and has no position
table that limits the length it can read. The seeds trained these combinations with SSMax's n set to the full sequence
length for every row and a NoPE flag that parsed "False" as True; here n_i comes from the causal mask and each
variant is its own config section.

What is measured, and how (the report says the same):
  validation loss   each run's metrics.jsonl (curves) and the training loop's final evaluation at the training
                    length T = data.max_length (table).
  loss per position NLL of each position of `position_windows` disjoint validation windows of
                    eval_factor x T tokens (spread over the validation split, the same windows for every variant),
                    averaged over windows; summarised per segment [0, T), [T, 2T), [2T, 4T) with paired SSMax -
                    softmax differences (standard error over windows). NoPE and RoPE models are rebuilt with
                    max_seq_len = eval_factor x T and load the trained weights unchanged (no position table). A
                    learned table has T rows, so learned models are scored on the first T tokens of the same windows.
  context past T    the same windows cut into blocks of T tokens, each scored as its own sequence (every variant,
                    learned included): against the whole-window loss over [T, eval_factor x T) it says whether a
                    model profits from context beyond its training length or is hurt by it.
  retrieval probe   a random "passkey" of probe_key_len tokens planted probe_key_offset tokens into a stretch of
                    validation text, and repeated at the very end of a context of f x T tokens (f in
                    probe_factors); the model reads the repeat teacher-forced and is scored on predicting its tokens
                    2..k, which it can only do by copying them from the planted key (an induction / copy probe,
                    Olsson et al. 2022). The control is the same sequence with a different random key planted, so
                    the query and everything the model could know without retrieving are identical. Key tokens are
                    frequent training pieces that do not occur in the trial's filler text, so the planted key is
                    the only earlier occurrence of each. Reported: top-1 accuracy (planted and control) and the
                    mean log-probability gain planted - control in nats per key token, with standard errors over
                    trials; the same trials for every variant.
  SSMax scales      the learned s_h of each layer (initialised to 1).
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from superlm_jax.config import validate
from superlm_jax.data import pipeline
from superlm_jax.data.prepare import prepare
from superlm_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from superlm_jax.errors import UserError
from superlm_jax.experiments.common import (jsonable, machine, read_metrics, run_cli, train_runs,
                                            save_report, with_max_seq_len)
from superlm_jax.experiments.common import markdown_table as _markdown_table
from superlm_jax.models import accounting
from superlm_jax.models.transformer import build_model, head_dim

# Every variant the study knows, in report order: section name -> (model.scoring, model.positions).
ALL_VARIANTS = {
    "softmax_learned": ("softmax", "learned"), "ssmax_learned": ("ssmax", "learned"),
    "softmax_nope": ("softmax", "none"), "ssmax_nope": ("ssmax", "none"),
    "softmax_rope": ("softmax", "rope"), "ssmax_rope": ("ssmax", "rope"),
}
POSITION_LABELS = {"learned": "learned", "none": "NoPE", "rope": "RoPE"}
SCORING_LABELS = {"softmax": "softmax", "ssmax": "SSMax"}
COLORS = {"learned": "tab:gray", "none": "tab:blue", "rope": "tab:red"}
LINESTYLES = {"softmax": "-", "ssmax": "--"}
# Keys the runs may differ in (configs/ssmax_nope.py ties everything else together).
_PER_RUN_KEYS = {"model": ("scoring", "positions"), "train": ("workdir",)}
_SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)


def label(variant: str) -> str:
  scoring, positions = ALL_VARIANTS[variant]
  return f"{SCORING_LABELS[scoring]} + {POSITION_LABELS[positions]}"


# ---------------------------------------------------------------------------------------------- config checks
def selected_variants(config: ml_collections.ConfigDict) -> list[str]:
  """study.variants as a list of section names, in report order; UserError for an unknown or repeated name."""
  names = [v.strip() for v in str(config.study.variants).split(",") if v.strip()]
  if not names:
    raise UserError(f"study.variants is empty; choose from: {', '.join(ALL_VARIANTS)}")
  for name in names:
    if name not in ALL_VARIANTS:
      raise UserError(f"study.variants: unknown variant {name!r}; choose from: {', '.join(ALL_VARIANTS)}")
    if name not in config:
      raise UserError(f"study.variants names {name!r} but the config has no such section (see configs/ssmax_nope.py)")
  if len(set(names)) != len(names):
    raise UserError(f"study.variants repeats a variant: {config.study.variants!r}")
  return [name for name in ALL_VARIANTS if name in names]


def check_study_config(config: ml_collections.ConfigDict) -> list[str]:
  """UserError unless the selected runs are a controlled comparison: the same GPT-2 model, data and training, only
  the scoring and the positions (and run directories) differ, each as its section name says. Returns the
  selected variants."""
  if "study" not in config:
    raise UserError("the study config needs a `study` section (see configs/ssmax_nope.py)")
  variants = selected_variants(config)
  for name in variants:
    validate(config[name])
    scoring, positions = ALL_VARIANTS[name]
    m = config[name].model
    if (m.scoring, m.positions) != (scoring, positions):
      raise UserError(f"study: section {name} needs model.scoring={scoring!r} and model.positions={positions!r}, "
                      f"got {m.scoring!r} and {m.positions!r}")
  ref_name = variants[0]
  ref = config[ref_name]
  for name in variants[1:]:
    for section in ("model", "data", "train"):
      for key, value in ref[section].items():
        if key in _PER_RUN_KEYS.get(section, ()):
          continue
        if config[name][section][key] != value:
          raise UserError(f"study: {ref_name}.{section}.{key}={value!r} but {name}.{section}.{key}="
                          f"{config[name][section][key]!r}; the comparison needs them equal")
  if ref.model.attention != "mha":
    raise UserError("study: model.attention must be 'mha' (MLA ties its rotary key to model.positions)")
  if ref.model.max_seq_len != ref.data.max_length:
    raise UserError(f"study: model.max_seq_len={ref.model.max_seq_len} must equal data.max_length="
                    f"{ref.data.max_length}: a learned table with rows that training never reaches would hide the "
                    "length limit, and NoPE/RoPE models are rebuilt longer for evaluation anyway")
  workdirs = {Path(config[name].train.workdir).resolve() for name in variants}
  if len(workdirs) != len(variants):
    raise UserError("study: two runs would share a train.workdir")

  s, T = config.study, ref.data.max_length
  for key in ("eval_factor", "position_windows", "probe_trials", "probe_pool", "eval_batch"):
    if not isinstance(s[key], int) or s[key] < 1:
      raise UserError(f"study.{key} must be a positive integer, got {s[key]!r}")
  factors = tuple(s.probe_factors)
  if not factors or any(not isinstance(f, int) or not 1 <= f <= s.eval_factor for f in factors):
    raise UserError(f"study.probe_factors={factors!r} must be integers in [1, study.eval_factor={s.eval_factor}]")
  if len(set(factors)) != len(factors):
    raise UserError(f"study.probe_factors={factors!r} repeats a length")
  if s.probe_key_len < 2:
    raise UserError(f"study.probe_key_len={s.probe_key_len} must be at least 2 (its first token is the cue)")
  if s.probe_key_offset < 0:
    raise UserError(f"study.probe_key_offset={s.probe_key_offset} must be >= 0")
  if s.probe_key_offset + 2 * s.probe_key_len + 1 > min(factors) * T:
    raise UserError(f"study: probe_key_offset + 2 * probe_key_len + 1 = "
                    f"{s.probe_key_offset + 2 * s.probe_key_len + 1} does not fit the shortest probe context "
                    f"{min(factors) * T}; shorten the key")
  if s.probe_pool < 2 * s.probe_key_len:
    raise UserError(f"study.probe_pool={s.probe_pool} must hold at least two keys (2 * probe_key_len)")
  return variants


# ---------------------------------------------------------------------------------------------- scoring
class Scorer:
  """Per-token NLL and top-1 correctness of a trained model on [n, l] token arrays, l <= `length`.

  One jitted forward pass at the fixed shape [batch, length] serves every evaluation of the model: shorter sequences
  are right-padded, which leaves the scores of their real positions unchanged (the model is causal, and SSMax's n_i
  is counted from the causal mask), and a partial last batch is padded with empty rows.
  """

  def __init__(self, model_cfg: ml_collections.ConfigDict, state: dict, length: int, batch: int,
               compute_dtype=jnp.float32, bar: tqdm | None = None):
    cfg = with_max_seq_len(model_cfg, length) if model_cfg.positions != "learned" else model_cfg
    if length > cfg.max_seq_len:
      raise UserError(f"cannot score {length} tokens with learned positions of {cfg.max_seq_len} rows")
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(cfg, compute_dtype=compute_dtype)), nnx.Param, ...)[0]
    self.length, self.batch, self.bar = length, batch, bar
    self._params, self._rest = state["params"], state["model_state"]

    @jax.jit
    def score(params, rest, inputs, targets):
      logits = nnx.merge(graphdef, params, rest)(inputs)
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
      return nll, jnp.argmax(logits, axis=-1) == targets

    self._score = score

  def __call__(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, l = inputs.shape
    if l > self.length:
      raise ValueError(f"sequences of {l} tokens exceed the scorer's {self.length}")
    nll, correct = np.zeros((n, l), np.float32), np.zeros((n, l), bool)
    for start in range(0, n, self.batch):
      rows = min(self.batch, n - start)
      x = np.zeros((self.batch, self.length), np.int32)
      y = np.zeros((self.batch, self.length), np.int32)
      x[:rows, :l], y[:rows, :l] = inputs[start:start + rows], targets[start:start + rows]
      batch_nll, batch_correct = self._score(self._params, self._rest, jnp.asarray(x), jnp.asarray(y))
      nll[start:start + rows] = np.asarray(batch_nll)[:rows, :l]
      correct[start:start + rows] = np.asarray(batch_correct)[:rows, :l]
      if self.bar is not None:
        self.bar.update(1)
    return nll, correct


# ---------------------------------------------------------------------------------------------- loss per position
def segments(train_length: int, eval_factor: int) -> list[tuple[int, int]]:
  """Token ranges [a*T, b*T) for the summary: [0, T), [T, 2T), [2T, 4T), ... up to eval_factor * T."""
  bounds, f = [0, 1], 1
  while f * 2 < eval_factor:
    f *= 2
    bounds.append(f)
  if bounds[-1] != eval_factor:
    bounds.append(eval_factor)
  return [(a * train_length, b * train_length) for a, b in zip(bounds, bounds[1:])]


def position_windows(data_dir: Path, length: int, count: int, batch: int) -> dict[str, np.ndarray]:
  """`count` disjoint validation windows of `length` tokens (spread over the split; the same on every call)."""
  batches = pipeline.eval_batches(data_dir, length, batch, -(-count // batch))
  windows = {key: np.concatenate([b[key] for b in batches])[:count] for key in ("inputs", "targets")}
  if len(windows["inputs"]) < count:
    raise UserError(f"the validation split has only {len(windows['inputs'])} windows of {length + 1} tokens; "
                    f"lower study.position_windows (now {count}) or study.eval_factor")
  return windows


def position_losses(scorer: Callable, windows: dict[str, np.ndarray], length: int) -> np.ndarray:
  """[windows, length] NLL of each position of the windows' first `length` tokens."""
  nll, _ = scorer(windows["inputs"][:, :length], windows["targets"][:, :length])
  return nll


def restarted_losses(scorer: Callable, windows: dict[str, np.ndarray], train_length: int, length: int) -> np.ndarray:
  """[windows, length] NLL when the context restarts every `train_length` tokens: each block of T tokens of a window
  is scored as a sequence of its own, so no position ever sees more than T - 1 tokens of context or a position past
  the trained range. Against the whole-window scores of the same tokens, it tells whether a model profits from
  context beyond T (lower whole-window loss) or is hurt by it (higher)."""
  blocks = length // train_length
  n = windows["inputs"].shape[0]
  shape = (n * blocks, train_length)
  nll, _ = scorer(windows["inputs"][:, :blocks * train_length].reshape(shape),
                  windows["targets"][:, :blocks * train_length].reshape(shape))
  return nll.reshape(n, blocks * train_length)


def summarise_positions(nll: np.ndarray, spans: list[tuple[int, int]]) -> dict[str, Any]:
  """Mean NLL per position (5 decimals: report.json stays small), and per segment (within the scored length) with
  each window's segment mean kept for paired comparisons."""
  out = {"per_position": np.round(nll.mean(0), 5), "segments": []}
  for a, b in spans:
    if b <= nll.shape[1]:
      per_window = nll[:, a:b].mean(1)
      out["segments"].append({"start": a, "end": b, "mean": float(per_window.mean()), "per_window": per_window})
    else:
      out["segments"].append({"start": a, "end": b, "mean": None, "per_window": None})
  return out


# ---------------------------------------------------------------------------------------------- retrieval probe
def probe_pool(train_tokens: np.ndarray, vocab_size: int, size: int) -> np.ndarray:
  """The `size` most frequent pieces of the training split, without the control symbols (pad, unk, bos, eos):
  keys made of pieces the model has seen often, so the probe tests copying, not unfamiliar embeddings."""
  counts = np.bincount(np.asarray(train_tokens, np.int64), minlength=vocab_size)
  counts[list(_SPECIAL_IDS)] = 0
  order = np.argsort(-counts, kind="stable")
  return order[:min(size, int((counts > 0).sum()))]


def build_probe(val_tokens: np.ndarray, pool: np.ndarray, length: int, key_len: int, offset: int, trials: int,
                seed: int) -> dict[str, np.ndarray]:
  """`trials` probe sequences of `length` + 1 tokens: validation text with a random key of `key_len` pool tokens
  planted at `offset` and repeated as the last `key_len` tokens. The control rows plant a different random key
  (disjoint from the first); the repeat at the end is the same. Key tokens never occur in the trial's filler text,
  so the planted key is the only earlier occurrence of each query token.

  Returns {"planted", "control": int32 [trials, length + 1], "keys": [trials, key_len], "scored": the input positions
  whose targets are key tokens 2..key_len}."""
  val_tokens = np.asarray(val_tokens)
  if len(val_tokens) < length + 1:
    raise UserError(f"the validation split ({len(val_tokens)} tokens) is shorter than a probe of {length + 1}")
  rng = np.random.default_rng([seed, length])
  planted = np.empty((trials, length + 1), np.int32)
  control = np.empty_like(planted)
  keys = np.empty((trials, key_len), np.int32)
  query = slice(length + 1 - key_len, length + 1)
  for t in range(trials):
    start = int(rng.integers(0, len(val_tokens) - length))
    seq = np.asarray(val_tokens[start:start + length + 1], np.int32).copy()
    filler = np.concatenate([seq[:offset], seq[offset + key_len:query.start]])
    candidates = np.setdiff1d(pool, filler)
    if len(candidates) < 2 * key_len:
      raise UserError(f"only {len(candidates)} of the study.probe_pool={len(pool)} key tokens are absent from a "
                      f"{length}-token probe's filler; raise study.probe_pool")
    both = rng.choice(candidates, 2 * key_len, replace=False)
    key, other = both[:key_len], both[key_len:]
    seq[query] = key
    planted[t], control[t], keys[t] = seq, seq, key
    planted[t, offset:offset + key_len] = key
    control[t, offset:offset + key_len] = other
  return {"planted": planted, "control": control, "keys": keys,
          "scored": np.arange(length + 1 - key_len, length)}


def score_probe(scorer: Callable, probe: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per trial: mean log-probability (nats) and top-1 accuracy over the scored key tokens, planted and control."""
  out = {}
  for condition in ("planted", "control"):
    seqs = probe[condition]
    nll, correct = scorer(seqs[:, :-1], seqs[:, 1:])
    out[f"logp_{condition}"] = -nll[:, probe["scored"]].mean(1)
    out[f"acc_{condition}"] = correct[:, probe["scored"]].mean(1)
  out["gain"] = out["logp_planted"] - out["logp_control"]
  return out


def _mean_se(x: np.ndarray) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan"),
          "n": int(x.size)}


def summarise_probe(per_trial: dict[str, np.ndarray]) -> dict[str, Any]:
  out = {key: _mean_se(values) for key, values in per_trial.items()}
  out["per_trial_gain"] = per_trial["gain"]
  out["per_trial_acc_planted"] = per_trial["acc_planted"]
  return out


# ---------------------------------------------------------------------------------------------- other measurements
def ssmax_scales(params) -> list[list[float]] | None:
  """The learned SSMax s_h per layer (block order) and head, from a train state's params; None without SSMax."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = jax.tree_util.keystr(path)
    if "ssmax_scale" in key:
      layer = [int(i) for i in re.findall(r"\['?(\d+)'?\]", key)]
      found.append((layer, np.asarray(leaf, np.float64).tolist()))
  return [scale for _, scale in sorted(found)] or None


def data_order_fingerprint(cfg: ml_collections.ConfigDict, data_dir: Path, batches: int = 4) -> str:
  """sha256 of the first `batches` training batches the run's config yields, built exactly as the training loop
  builds its iterator: equal fingerprints mean the runs read the same windows in the same order."""
  it = pipeline.make_train_iterator(data_dir, cfg.data.max_length, cfg.data.stride,
                                    cfg.train.batch_size * cfg.train.grad_accum_steps, cfg.data.seed)
  h = hashlib.sha256()
  for _ in range(batches):
    batch = next(it)
    h.update(np.ascontiguousarray(batch["inputs"], np.int32).tobytes())
  return h.hexdigest()


def paired(a: np.ndarray | None, b: np.ndarray | None) -> dict[str, float] | None:
  """Mean and standard error of a - b over paired samples (windows or probe trials)."""
  if a is None or b is None:
    return None
  return _mean_se(np.asarray(a, np.float64) - np.asarray(b, np.float64))


# ---------------------------------------------------------------------------------------------- figures
def _style(variant: str) -> dict:
  scoring, positions = ALL_VARIANTS[variant]
  return dict(color=COLORS[positions], linestyle=LINESTYLES[scoring], label=label(variant))


def plot_losses(runs: dict[str, dict], path: Path, title: str) -> None:
  from matplotlib.figure import Figure  # No pyplot: no global state, no display needed.
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, 2)
  for name, run in runs.items():
    if run["train_curve"]:
      axes[0].plot(*zip(*run["train_curve"]), linewidth=1.1, **_style(name))
    if run["val_curve"]:
      axes[1].plot(*zip(*run["val_curve"]), marker="o", markersize=3, **_style(name))
  for ax, what in zip(axes, ("training loss", "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} (nats/token)")
    ax.set_title(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


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
  for name, run in runs.items():
    values = np.asarray(run["position_loss"]["per_position"], np.float64)
    x, y = _bucketed(values, width)
    for ax in axes:
      ax.plot(x, y, linewidth=1.4, **_style(name))
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
  for name, run in runs.items():
    style = _style(name)
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
  factors, rows = report["study"]["probe_factors"], []
  for name, r in report["runs"].items():
    segs = [_fmt(s["mean"]) for s in r["position_loss"]["segments"]]
    acc = " / ".join(_fmt(r["probe"][str(f)]["acc_planted"]["mean"], ".2f") if r["probe"].get(str(f)) else "n/a"
                     for f in factors)
    gain = " / ".join(_fmt(r["probe"][str(f)]["gain"]["mean"], "+.3f") if r["probe"].get(str(f)) else "n/a"
                      for f in factors)
    rows.append((label(name), f"{r['parameters']:,}", f"{r['final_val_loss']:.4f}", *segs, acc, gain))
  return rows


def header(report: dict) -> tuple[str, ...]:
  T = report["train_length"]
  segs = tuple(f"loss at positions {a // T}-{b // T}x T" if a else "loss at positions < T"
               for a, b in ((s["start"], s["end"]) for s in next(iter(report["runs"].values()))["position_loss"]
                            ["segments"]))
  factors = "/".join(f"{f}x" for f in report["study"]["probe_factors"])
  return ("variant", "parameters", "val loss (T)", *segs, f"probe accuracy {factors}",
          f"probe gain {factors} (nats)")


def markdown_table(rows: list[tuple[str, ...]], names: tuple[str, ...] | None = None) -> str:
  """The headline table; without `names` (the report's `headline_header`) the columns get generic names."""
  if names is None:
    n = len(rows[0]) if rows else 5
    names = ("variant", "parameters", "val loss (T)") + tuple(f"loss segment {i + 1}" for i in range(n - 5)) + (
        "probe accuracy", "probe gain (nats)")
  return _markdown_table(tuple(names), rows, left=1)


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
  for name, r in report["runs"].items():
    b = r["beyond_training_length"]
    rows.append((label(name), _fmt(b["whole_window"]), _fmt(b["restarted"]), _fmt_pm(b.get("difference"))))
  return rows


def discussion(report: dict) -> list[str]:
  """Conclusions drawn from the numbers (not written in advance)."""
  runs, T, out = report["runs"], report["train_length"], []
  E = report["eval_length"]
  names = list(runs)

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
  parts = [f"{label(n)} {runs[n]['final_val_loss']:.4f}" for n in names]
  cmp = report["ssmax_minus_softmax"]
  in_range = [f"{POSITION_LABELS[p]} {_fmt_pm(d['segments'][0], '+.4f')} ({verdict(d['segments'][0])})"
              for p, d in cmp.items()]
  out.append(
      f"**At the training length.** Final validation loss at T = {T}: {', '.join(parts)} nats/token (best "
      f"{label(best)}, worst {label(worst)}, a spread of "
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
  long = [n for n in names if ALL_VARIANTS[n][1] != "learned"]
  if long and len(runs[long[0]]["position_loss"]["segments"]) > 1:
    lines = []
    for n in long:
      segs = runs[n]["position_loss"]["segments"]
      near = runs[n]["near_end_loss"]
      lines.append(f"{label(n)}: {near:.3f} just before T, then " +
                   ", ".join(f"{s['mean']:.3f} at {s['start'] // T}-{s['end'] // T}x" for s in segs[1:]))
    rise = {n: runs[n]["position_loss"]["segments"][-1]["mean"] - runs[n]["near_end_loss"] for n in long}
    best_rise, worst_rise = min(long, key=rise.get), max(long, key=rise.get)
    beyond = [f"{POSITION_LABELS[p]} {_fmt_pm(d['segments'][-1], '+.3f')} ({verdict(d['segments'][-1])})"
              for p, d in cmp.items() if p != "learned" and d["segments"][-1] is not None]
    out.append(
        f"**Beyond the training length.** Mean loss over the last quarter of the trained range [{3 * T // 4}, {T}) "
        f"against the segments past it: {'; '.join(lines)}. A model that generalises in length keeps the loss flat "
        f"or falling past T (more context can only help a good model); the smallest rise from [3T/4, T) to the last "
        f"segment is {label(best_rise)}'s ({rise[best_rise]:+.3f}), the largest {label(worst_rise)}'s "
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
    ssmax_long = [n for n in long if ALL_VARIANTS[n][0] == "ssmax"]
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
    text = "; ".join(f"{label(n)} {b['whole_window']:.3f} vs {b['restarted']:.3f} "
                     f"({_fmt_pm(b['difference'], '+.3f')})" for n, b in restart)
    helped = [label(n) for n, b in restart if b["difference"]["mean"] < -2 * b["difference"]["se"]]
    hurt = [label(n) for n, b in restart if b["difference"]["mean"] > 2 * b["difference"]["se"]]
    learned_restart = [f"{label(n)} {runs[n]['beyond_training_length']['restarted']:.3f}" for n in names
                       if ALL_VARIANTS[n][1] == "learned"]
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
    lines.append(f"{label(n)}: {', '.join(cells)}")
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
    text = "; ".join(f"{label(n)}: " + ", ".join(f"{v:.2f}" for v in s) for n, s in scales.items())
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


def write_report(report: dict, out_dir: Path) -> None:
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
      markdown_table(headline_rows(report), header(report)), "",
      f"Loss per position: mean NLL over {report['position_windows']} validation windows of {report['eval_length']} "
      f"tokens (learned: their first {T} tokens). Probe: top-1 accuracy and log-probability gain (planted - control) "
      f"on the repeated key, {s['probe_trials']} trials per length; lengths "
      f"{', '.join(str(f * T) for f in s['probe_factors'])}.",
      "", "SSMax - softmax, paired over the same windows and probe trials (± standard error):", "",
      _markdown_table(comparison_header(report), comparison_rows(report), left=1), "",
      f"Context past T: loss over positions [{T}, {report['eval_length']}) of the same windows, read whole (NoPE and "
      f"RoPE only) and with the context restarted every {T} tokens (every variant; no position past the trained "
      "range). A negative difference means the model profits from context beyond its training length.", "",
      _markdown_table(("variant", "whole window", f"restarted every {T}", "difference (± s.e.)"),
                      context_rows(report), left=1), "",
      "![validation loss](loss_curves.png)", "", "![loss per position](position_loss.png)", "",
      "![retrieval probe](probe.png)", "",
      "## Discussion", "",
  ]
  lines += [f"- {p}" for p in discussion(report)]
  lines += [
      "", "## How each number was obtained", "",
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
      "", f"Machine: {report['machine']}. Training time over the runs: "
      f"{sum(r['train_time_s'] for r in report['runs'].values()) / 60:.1f} min (summed over the invocations that "
      f"trained them); this invocation of the study: {report['wall_time_s'] / 60:.1f} min.", "",
  ]
  (out_dir / "report.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------- the study
def _train_curve(records: list[tuple[int, dict]]) -> list[tuple[int, float]]:
  return [(step, r["loss"]) for step, r in records if r.get("loss") is not None]


def run_study(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """Trains the selected variants (resuming if rerun), evaluates them, and writes report.md, report.json,
  loss_curves.png, position_loss.png and probe.png into `config.study.out_dir` (plus train_times.json). Returns the
  report dict (what report.json holds)."""
  started = time.perf_counter()
  variants = check_study_config(config)
  s = config.study
  out_dir = Path(s.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cfgs = {name: config[name] for name in variants}
  ref = cfgs[variants[0]]
  T, E = ref.data.max_length, s.eval_factor * ref.data.max_length
  factors = list(s.probe_factors)

  results, train_times = train_runs(
      cfgs, out_dir, progress=progress,
      describe=lambda name, cfg: f"scoring={cfg.model.scoring}, positions={cfg.model.positions}")

  data_dir = prepare(ref.data, ref.model.vocab_size)
  meta = pipeline.load_meta(data_dir)
  fingerprints = {name: data_order_fingerprint(cfg, data_dir) for name, cfg in cfgs.items()}
  windows = position_windows(data_dir, E, s.position_windows, s.eval_batch)
  train_tokens = np.memmap(data_dir / "train.bin", dtype=meta["dtype"], mode="r")
  val_tokens = np.memmap(data_dir / "val.bin", dtype=meta["dtype"], mode="r")
  pool = probe_pool(train_tokens, ref.model.vocab_size, s.probe_pool)
  probes = {f: build_probe(val_tokens, pool, f * T, s.probe_key_len, s.probe_key_offset, s.probe_trials,
                           s.probe_seed) for f in factors}
  spans = segments(T, s.eval_factor)
  metrics = {name: read_metrics(cfg.train.workdir) for name, cfg in cfgs.items()}

  compute_dtype = jnp.bfloat16 if ref.train.compute_dtype == "bfloat16" else jnp.float32
  lengths = {name: T if cfg.model.positions == "learned" else E for name, cfg in cfgs.items()}
  total = sum(-(-s.position_windows // s.eval_batch) + -(-s.position_windows * s.eval_factor // s.eval_batch)
              + sum(2 * -(-s.probe_trials // s.eval_batch) for f in factors if f * T <= lengths[name])
              for name in variants)
  interactive = sys.stderr.isatty()
  bar = tqdm(total=total, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True,
             mininterval=0.1 if interactive else 30.0)
  runs: dict[str, dict[str, Any]] = {}
  per_window: dict[str, list] = {}
  per_trial: dict[str, dict] = {}
  try:
    for name, cfg in cfgs.items():
      bar.set_description(f"evaluate {name}")
      scorer = Scorer(cfg.model, results[name].state, lengths[name], s.eval_batch, compute_dtype, bar=bar)
      nll = position_losses(scorer, windows, lengths[name])
      positions = summarise_positions(nll, spans)
      per_window[name] = [seg.pop("per_window") for seg in positions["segments"]]
      # The same tokens with the context restarted every T (a separate length-T scorer for the long models).
      short = scorer if lengths[name] == T else Scorer(cfg.model, results[name].state, T, s.eval_batch, compute_dtype,
                                                       bar=bar)
      restarted_nll = restarted_losses(short, windows, T, E)
      restarted = summarise_positions(restarted_nll, spans)
      del restarted["per_position"]  # A saw-tooth of the context restarts, not plotted; the segments are kept.
      for seg in restarted["segments"]:
        seg.pop("per_window")
      beyond = {"whole_window": float(nll[:, T:].mean()) if lengths[name] > T else None,
                "restarted": float(restarted_nll[:, T:].mean())}
      if lengths[name] > T:
        beyond["difference"] = paired(nll[:, T:].mean(1), restarted_nll[:, T:].mean(1))
      probe = {}
      for f in factors:
        probe[str(f)] = summarise_probe(score_probe(scorer, probes[f])) if f * T <= lengths[name] else None
      per_trial[name] = {f: (p.pop("per_trial_gain"), p.pop("per_trial_acc_planted")) if p else None
                         for f, p in probe.items()}
      scales = ssmax_scales(results[name].state["params"])
      runs[name] = {
          "scoring": cfg.model.scoring, "positions": cfg.model.positions,
          "parameters": accounting.parameter_count(cfg.model)["total"],
          "steps_trained": int(results[name].state["step"]),
          "last_logged_step": max(step for split in metrics[name].values() for step, _ in split),
          "final_val_loss": float(results[name].val_loss),
          "val_curve": [(step, r["loss"]) for step, r in metrics[name].get("val", [])],
          "train_curve": _train_curve(metrics[name].get("train", [])),
          "train_time_s": train_times[name],
          "eval_length": lengths[name],
          "position_loss": positions,
          "near_end_loss": float(positions["per_position"][3 * T // 4:T].mean()),
          "restarted_loss": restarted,
          "beyond_training_length": beyond,
          "probe": probe,
          "ssmax_scale": scales,
          "ssmax_scale_layer_means": [float(np.mean(layer)) for layer in scales] if scales else None,
          "data_order_fingerprint": fingerprints[name],
          "workdir": str(cfg.train.workdir),
      }
  finally:
    bar.close()

  # SSMax - softmax per position scheme (both selected), and NoPE - learned per scoring, paired.
  ssmax_minus_softmax = {}
  for positions in ("learned", "none", "rope"):
    pair = [n for n in variants if ALL_VARIANTS[n][1] == positions]
    if len(pair) != 2:
      continue
    soft, ss = sorted(pair, key=lambda n: ALL_VARIANTS[n][0] != "softmax")
    ssmax_minus_softmax[positions] = {
        "segments": [paired(a, b) for a, b in zip(per_window[ss], per_window[soft])],
        "probe": {str(f): {"gain": paired(per_trial[ss][str(f)][0], per_trial[soft][str(f)][0]),
                           "acc_planted": paired(per_trial[ss][str(f)][1], per_trial[soft][str(f)][1])}
                  for f in factors if per_trial[ss][str(f)] and per_trial[soft][str(f)]},
    }
  # Position schemes against each other at the training length, per scoring, paired over the same windows.
  positions_differences: dict[str, dict] = {}
  for scoring in ("softmax", "ssmax"):
    for a, b in (("nope", "learned"), ("rope", "learned"), ("rope", "nope")):
      first, second = f"{scoring}_{a}", f"{scoring}_{b}"
      if first in per_window and second in per_window:
        positions_differences.setdefault(scoring, {})[f"{a}-{b}"] = paired(per_window[first][0],
                                                                           per_window[second][0])

  m = ref.model
  report = {
      "name": ref.name.replace(f"ssmax_nope/{variants[0]}", "ssmax_nope"),
      "machine": machine(),
      "variants": variants,
      "steps": ref.train.steps,
      "train_shape": f"{ref.train.batch_size * ref.train.grad_accum_steps} x {T}",
      "train_length": T,
      "eval_length": E,
      "position_windows": int(windows["inputs"].shape[0]),
      "unigram_val_loss": float(meta["unigram_val_loss"]),
      "data_order_identical": len(set(fingerprints.values())) == 1,
      "config": {
          "d_model": m.d_model, "num_layers": m.num_layers, "num_heads": m.num_heads, "head_dim": head_dim(m),
          "d_ff": m.d_ff, "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len, "rope_theta": m.rope_theta,
          "seed": ref.train.seed, "data_seed": ref.data.seed, "batch_size": ref.train.batch_size,
          "learning_rate": ref.train.learning_rate,
      },
      "study": dict(s.to_dict(), probe_factors=factors),
      "probe_pool_size": int(len(pool)),
      "runs": runs,
      "ssmax_minus_softmax": ssmax_minus_softmax,
      "positions_differences": positions_differences,
      "files": ["report.md", "report.json", "loss_curves.png", "position_loss.png", "probe.png"],
  }
  title = f"SSMax x NoPE ({report['name']})"
  plot_losses(runs, out_dir / "loss_curves.png", title)
  plot_position_loss(runs, T, E, report["unigram_val_loss"], out_dir / "position_loss.png", title)
  plot_probe(runs, factors, T, out_dir / "probe.png", title)
  report["wall_time_s"] = time.perf_counter() - started
  report["headline_header"] = list(header(jsonable(report)))
  return save_report(report, out_dir, headline_rows, write_report)


if __name__ == "__main__":
  run_cli(run_study, "configs/ssmax_nope.py:tiny", markdown_table)
