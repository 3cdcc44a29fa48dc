"""SSMax x NoPE (reference project 000/001): one GPT-2-style decoder trained once per attention scoring {softmax, SSMax} x
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

This module measures and writes report.json; `ssmax_nope_report` draws report.md and the figures from it alone.
"""

from __future__ import annotations

import hashlib
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

from superlm_jax.data import pipeline
from superlm_jax.data.prepare import prepare
from superlm_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from superlm_jax.errors import UserError
from superlm_jax.experiments import ssmax_nope_report as report_lib
from superlm_jax.experiments.common import (Comparison, check_comparison, jsonable, machine, read_metrics, run_cli,
                                            save_report, train_runs, with_max_seq_len)
from superlm_jax.models import accounting
from superlm_jax.models.spec import ModelSpec, parse_dtype
from superlm_jax.models.transformer import abstract_model
from superlm_jax.training.evaluate import Average, pad_rows, token_nll

# Every variant the study knows, in report order: section name -> (model.scoring, model.positions).
ALL_VARIANTS = {
    "softmax_learned": ("softmax", "learned"), "ssmax_learned": ("ssmax", "learned"),
    "softmax_nope": ("softmax", "none"), "ssmax_nope": ("ssmax", "none"),
    "softmax_rope": ("softmax", "rope"), "ssmax_rope": ("ssmax", "rope"),
}
# The controlled comparison: one config section per variant, differing only in the scoring and the positions (and
# the run directory). configs/ssmax_nope.py builds its sections from it and ties every other key together.
COMPARISON = Comparison(runs=tuple(ALL_VARIANTS),
                        may_differ=(("model", ("scoring", "positions")), ("train", ("workdir",))))
_SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)


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
  """UserError unless the selected runs are a controlled comparison (`COMPARISON`: the same GPT-2 model, data and
  training, only the scoring and the positions, and run directories, differ), each section's scoring and positions
  are what its name says, and the study settings fit the training length. Returns the selected variants."""
  if "study" not in config:
    raise UserError("the study config needs a `study` section (see configs/ssmax_nope.py)")
  variants = selected_variants(config)
  check_comparison(config, COMPARISON, variants)
  for name in variants:
    scoring, positions = ALL_VARIANTS[name]
    m = config[name].model
    if (m.scoring, m.positions) != (scoring, positions):
      raise UserError(f"study: section {name} needs model.scoring={scoring!r} and model.positions={positions!r}, "
                      f"got {m.scoring!r} and {m.positions!r}")
  ref = config[variants[0]]
  if ref.model.attention != "mha":
    raise UserError("study: model.attention must be 'mha' (MLA ties its rotary key to model.positions)")
  if ref.model.max_seq_len != ref.data.max_length:
    raise UserError(f"study: model.max_seq_len={ref.model.max_seq_len} must equal data.max_length="
                    f"{ref.data.max_length}: a learned table with rows that training never reaches would hide the "
                    "length limit, and NoPE/RoPE models are rebuilt longer for evaluation anyway")

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
def make_scorer(model_cfg: ml_collections.ConfigDict, state: dict, length: int, batch: int,
                compute_dtype=jnp.float32, bar: tqdm | None = None
                ) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """A trained model's scorer: (inputs, targets [n, l], l <= `length`) -> ([n, l] per-token NLL, [n, l] top-1
  correct), which each measurement reduces its own way (per position, per window, per probe trial).

  The NLL is the evaluator's (`training.evaluate.token_nll`); top-1 correctness (the probe's accuracy) is the argmax
  of the same forward pass, which XLA computes once for both. One jitted program at the fixed shape [batch, length]
  serves every evaluation of the model: shorter sequences are right-padded, which leaves the scores of their real
  positions unchanged (the model is causal, and SSMax's n_i is counted from the causal mask), and a partial last
  batch is padded with `pad_rows`, its extra rows dropped. NoPE and RoPE models are rebuilt for `length` tokens
  (their weights do not depend on it); a learned table cannot be.
  """
  cfg = with_max_seq_len(model_cfg, length) if model_cfg.positions != "learned" else model_cfg
  if length > cfg.max_seq_len:
    raise UserError(f"cannot score {length} tokens with learned positions of {cfg.max_seq_len} rows")
  graphdef = nnx.split(abstract_model(ModelSpec.from_config(cfg, compute_dtype)), nnx.Param, ...)[0]
  params, model_state = state["params"], state["model_state"]

  @jax.jit
  def nll_and_top1(params, model_state, tokens):
    model = nnx.merge(graphdef, params, model_state)
    return token_nll(model, tokens), jnp.argmax(model(tokens["inputs"]), axis=-1) == tokens["targets"]

  def score(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, l = inputs.shape
    if l > length:
      raise ValueError(f"sequences of {l} tokens exceed the scorer's {length}")
    nll, correct = np.zeros((n, l), np.float32), np.zeros((n, l), bool)
    right = ((0, 0), (0, length - l))
    for start in range(0, n, batch):
      rows = slice(start, min(start + batch, n))
      padded, _ = pad_rows({"inputs": np.pad(np.asarray(inputs[rows], np.int32), right),
                            "targets": np.pad(np.asarray(targets[rows], np.int32), right)}, batch)
      batch_nll, batch_correct = nll_and_top1(params, model_state, {k: jnp.asarray(v) for k, v in padded.items()})
      real = rows.stop - start
      nll[rows], correct[rows] = np.asarray(batch_nll)[:real, :l], np.asarray(batch_correct)[:real, :l]
      if bar is not None:
        bar.update(1)
    return nll, correct

  return score


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


def summarise_probe(per_trial: dict[str, np.ndarray]) -> dict[str, Any]:
  """Mean ± standard error over trials of each per-trial score, keeping the gain and planted accuracy per trial
  for the paired SSMax - softmax comparisons."""
  out = {key: Average().add(values).to_json() for key, values in per_trial.items()}
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
  return Average().add(np.asarray(a, np.float64) - np.asarray(b, np.float64)).to_json()


# ---------------------------------------------------------------------------------------------- the study
def _train_curve(records: list[tuple[int, dict]]) -> list[tuple[int, float]]:
  return [(step, r["loss"]) for step, r in records if r.get("loss") is not None]


def run_study(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """Trains the selected variants (resuming if rerun), evaluates them, and writes report.json, and from it
  (`ssmax_nope_report.write_report`) report.md and the figures, into `config.study.out_dir` (plus
  train_times.json). Returns the report dict (what report.json holds)."""
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

  compute_dtype = parse_dtype(ref.train.compute_dtype)
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
      scorer = make_scorer(cfg.model, results[name].state, lengths[name], s.eval_batch, compute_dtype, bar=bar)
      nll = position_losses(scorer, windows, lengths[name])
      positions = summarise_positions(nll, spans)
      per_window[name] = [seg.pop("per_window") for seg in positions["segments"]]
      # The same tokens with the context restarted every T (a separate length-T scorer for the long models).
      short = scorer if lengths[name] == T else make_scorer(cfg.model, results[name].state, T, s.eval_batch,
                                                            compute_dtype, bar=bar)
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
          "d_model": m.d_model, "num_layers": m.num_layers, "num_heads": m.num_heads,
          "head_dim": ModelSpec.from_config(m).head_dim,
          "d_ff": m.d_ff, "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len, "rope_theta": m.rope_theta,
          "seed": ref.train.seed, "data_seed": ref.data.seed, "batch_size": ref.train.batch_size,
          "learning_rate": ref.train.learning_rate,
      },
      "study": dict(s.to_dict(), probe_factors=factors),
      "probe_pool_size": int(len(pool)),
      "runs": runs,
      "ssmax_minus_softmax": ssmax_minus_softmax,
      "positions_differences": positions_differences,
      "files": ["report.md", "report.json", *report_lib.FIGURES],
  }
  report["wall_time_s"] = time.perf_counter() - started
  report["headline_header"] = list(report_lib.header(jsonable(report)))
  return save_report(report, out_dir, report_lib.headline_rows, report_lib.write_report)


if __name__ == "__main__":
  # No headline table function: the report stores its column names (`headline_header`), which run_cli prints.
  run_cli(run_study, "configs/ssmax_nope.py:tiny", table=None)
