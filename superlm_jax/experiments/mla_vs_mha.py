"""MHA vs MLA (seed 004): the same decoder trained twice, once with multi-head attention and once with DeepSeek's
Multi-head Latent Attention, then compared on what MLA is for and what it costs.

  python -m superlm_jax.experiments.mla_vs_mha --config=configs/mla_vs_mha.py:tiny

MLA (DeepSeek-V2, arXiv 2405.04434, sec. 2.1) caches one latent c_kv of width kv_lora_rank plus one shared rotary
key per token instead of every head's keys and values, so its claim is a smaller decode cache at comparable
quality. The seed's study compared against an "MLA" whose latent was wider than the model, which expanded the cache;
this one reports the cache ratio from the accounting formula, checks it against the real cache buffers, and also
reports the things MLA does not improve here (training memory, step time on a small CPU model).

What is measured, and how (the report says the same):
  parameters      `models.accounting.parameter_count` (total) and the attention modules' share, each checked
                  against the built model's `nnx.Param` leaves; a mismatch is a bug and stops the study before
                  any training.
  KV cache        `accounting.kv_cache_bytes_per_token` (bf16), checked against the buffers `init_cache` allocates;
                  at `study.long_context` x `study.long_context_batch` tokens it is the decode-time memory.
  training memory the jitted train step compiled ahead of time for a [1, long_context_batch, long_context] batch:
                  XLA's buffer assignment (`compiled.memory_analysis()`): arguments + outputs - donated aliases +
                  temporaries. It is what XLA plans to allocate, not the process's RSS. (On CPU with jax 0.10.2
                  `peak_memory_in_bytes` omits the temporaries, so it is recorded but not used.)
  step time       the jitted train step at the training shape, timed after warm-up in windows that alternate
                  between the two models (so background load on a shared CPU hits both alike); the median
                  and the fastest window (background load only adds time). The median of the runs' metrics.jsonl
                  tokens/s is reported next to them.
  decode          `Generator` (MLA in the absorbed form unless decode.absorb is False), greedy, batch 1, a
                  `decode_prompt`-token prompt from the validation text and `decode_tokens` new tokens, after a
                  warm-up generation; tokens/s over the single-token steps, and the prefill-to-first-token time,
                  from the fastest of `decode_repeats` generations.
  loss            train and validation curves from each run's metrics.jsonl; the final validation loss, and the
                  paired per-batch difference MLA - MHA on the same validation batches with its standard error.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from superlm_jax.config import validate
from superlm_jax.data import pipeline
from superlm_jax.data.prepare import prepare
from superlm_jax.errors import UserError
from superlm_jax.experiments.common import machine, read_metrics, run_cli, save_report, with_max_seq_len
from superlm_jax.experiments.common import markdown_table as _markdown_table
from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.models import accounting
from superlm_jax.models.transformer import build_model, head_dim
from superlm_jax.training.loop import train
from superlm_jax.training.optim import make_optimizer
from superlm_jax.training.step import init_train_state, make_eval_step, make_train_step

MODELS = ("mha", "mla")
# Keys the two sections may differ in (configs/mla_vs_mha.py ties everything else together).
_MODEL_KEYS_ALLOWED_TO_DIFFER = ("attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                 "v_head_dim")
MIB = 2**20


# ---------------------------------------------------------------------------------------------- config checks
def check_study_config(config: ml_collections.ConfigDict) -> None:
  """UserError unless the two runs are a controlled comparison: only the attention kind and MLA ranks differ."""
  for name in MODELS:
    if name not in config:
      raise UserError(f"the study config needs a `{name}` section (see configs/mla_vs_mha.py)")
    validate(config[name])
  mha, mla = config.mha, config.mla
  if mha.model.attention != "mha" or mla.model.attention != "mla":
    raise UserError("study: mha.model.attention must be 'mha' and mla.model.attention 'mla'")
  for section in ("model", "data", "train"):
    for key, value in mha[section].items():
      if section == "model" and key in _MODEL_KEYS_ALLOWED_TO_DIFFER:
        continue
      if section == "train" and key == "workdir":
        continue
      if mla[section][key] != value:
        raise UserError(f"study: mha.{section}.{key}={value!r} but mla.{section}.{key}={mla[section][key]!r}; "
                        "the comparison needs them equal")
  if Path(mha.train.workdir).resolve() == Path(mla.train.workdir).resolve():
    raise UserError(f"study: both runs would write to {mha.train.workdir}")
  s = config.study
  if s.decode_prompt < 1 or s.decode_tokens < 1:
    raise UserError("study.decode_prompt and study.decode_tokens must be positive")
  if s.decode_prompt + s.decode_tokens > mha.model.max_seq_len:
    raise UserError(f"study.decode_prompt + study.decode_tokens = {s.decode_prompt + s.decode_tokens} exceeds "
                    f"model.max_seq_len={mha.model.max_seq_len}")
  if s.decode_prompt > mha.data.max_length:
    raise UserError(f"study.decode_prompt={s.decode_prompt} exceeds data.max_length={mha.data.max_length}")
  if s.long_context < 1 or s.long_context_batch < 1:
    raise UserError("study.long_context and study.long_context_batch must be positive")
  if mha.model.positions == "learned" and s.long_context > mha.model.max_seq_len:
    raise UserError("study.long_context beyond model.max_seq_len needs positions without a learned table")


# ---------------------------------------------------------------------------------------------- parameters
def _leaf_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def built_parameter_counts(model: nnx.Module) -> dict[str, int]:
  """{'total', 'attention'}: what the built model actually holds."""
  attention = sum(_leaf_count(nnx.state(block.attn, nnx.Param)) for block in model.block_modules())
  return {"total": _leaf_count(nnx.state(model, nnx.Param)), "attention": attention}


def parameter_report(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Accounting's counts next to the built model's; RuntimeError if they disagree (a bug in one of them)."""
  counted = {"total": accounting.parameter_count(cfg)["total"], "attention": accounting.attention_parameter_count(cfg)}
  built = built_parameter_counts(build_model(cfg))
  if counted != built:
    raise RuntimeError(f"accounting {counted} disagrees with the built model {built}")
  return {"total": counted["total"], "attention": counted["attention"], "built_total": built["total"],
          "built_attention": built["attention"], "checked": True}


# ---------------------------------------------------------------------------------------------- memory
def kv_cache_report(cfg: ml_collections.ConfigDict, tokens: int, batch: int) -> dict[str, Any]:
  """bf16 cache per token from accounting, checked against the shapes `init_cache` allocates (never allocated:
  `jax.eval_shape`)."""
  per_token = accounting.kv_cache_bytes_per_token(cfg, bytes_per_value=2)
  long_cfg = with_max_seq_len(cfg, max(cfg.max_seq_len, tokens))
  model = build_model(long_cfg)
  cache = jax.eval_shape(lambda: model.init_cache(batch, tokens, jnp.bfloat16))
  allocated = sum(math.prod(x.shape) * x.dtype.itemsize for layer in cache.layers for x in layer.values())
  expected = per_token * tokens * batch
  if allocated != expected:
    raise RuntimeError(f"init_cache allocates {allocated} bytes, accounting says {expected}")
  return {"values_per_token_per_layer": accounting.kv_cache_values_per_token(cfg), "bytes_per_token": per_token,
          "long_context_bytes": expected, "long_context_tokens": tokens, "long_context_batch": batch}


def memory_stats(compiled) -> dict[str, int]:
  """XLA's buffer assignment of a compiled computation. The train state is donated, so outputs alias arguments;
  arguments + outputs - aliases + temporaries is what the executable needs at once."""
  m = compiled.memory_analysis()
  stats = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
           "xla_peak_memory_in_bytes": int(getattr(m, "peak_memory_in_bytes", -1))}
  stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
  return stats


def _train_step_for(cfg: ml_collections.ConfigDict, max_seq_len: int | None = None):
  """(jitted train step, a fresh train state) of a config's model; max_seq_len overrides the model's."""
  model_cfg = cfg.model if max_seq_len is None else with_max_seq_len(cfg.model, max_seq_len)
  compute_dtype = jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32
  model = build_model(model_cfg, seed=cfg.train.seed, compute_dtype=compute_dtype)
  tx = make_optimizer(cfg.train, model)
  graphdef, state = init_train_state(model, tx, cfg.train.seed)
  return make_train_step(graphdef, tx, label_smoothing=cfg.train.label_smoothing), state


def _batch_spec(batch: int, seq: int) -> dict:
  spec = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
  return {"inputs": spec, "targets": spec}


def training_memory(cfg: ml_collections.ConfigDict, seq: int, batch: int) -> dict[str, int]:
  """Compiles (never runs) the train step for a [1, batch, seq] batch and reads its buffer assignment."""
  step, state = _train_step_for(cfg, max_seq_len=max(cfg.model.max_seq_len, seq))
  abstract_state = jax.eval_shape(lambda: state)
  return memory_stats(step.lower(abstract_state, _batch_spec(batch, seq)).compile())


# ---------------------------------------------------------------------------------------------- timing
def time_train_steps(configs: dict[str, ml_collections.ConfigDict], windows: int, steps: int,
                     bar: tqdm | None = None) -> dict[str, dict[str, Any]]:
  """Seconds per train step at the training shape, per model, from `windows` windows of `steps` steps that
  alternate between the models: the median window and the fastest one. On a machine shared with other work the
  fastest window is the least disturbed estimate (background load only ever adds time). Also returns each step's
  buffer assignment at that shape (the same compile)."""
  runners = {}
  for name, cfg in configs.items():
    step, state = _train_step_for(cfg)
    shape = (1, cfg.train.batch_size, cfg.data.max_length)
    tokens = jax.random.randint(jax.random.key(0), shape, 0, cfg.model.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=-1)}
    compiled = step.lower(state, batch).compile()
    for _ in range(2):  # Warm-up: first calls pay allocation and page faults.
      state, out = compiled(state, batch)
    jax.block_until_ready(out)
    runners[name] = {"compiled": compiled, "state": state, "batch": batch, "times": [],
                     "memory": memory_stats(compiled)}
  for _ in range(windows):
    for name, r in runners.items():
      start = time.perf_counter()
      state = r["state"]
      for _ in range(steps):
        state, out = r["compiled"](state, r["batch"])
      jax.block_until_ready(out)
      r["times"].append((time.perf_counter() - start) / steps)
      r["state"] = state
      if bar is not None:
        bar.set_postfix_str(f"{name} {1e3 * r['times'][-1]:.1f} ms/step")
  return {name: {"step_time_s": statistics.median(r["times"]), "step_time_min_s": min(r["times"]),
                 "window_times_s": r["times"],
                 "memory": r["memory"]} for name, r in runners.items()}


def time_decode(model: nnx.Module, prompt: list[int], new_tokens: int, repeats: int, absorb: bool) -> dict[str, Any]:
  """Greedy cached generation of `new_tokens` tokens after a warm-up one, timed `repeats` times. The loop in
  `Generator.generate` moves every token to the host before the next step, so host timestamps at each token are step
  boundaries: tokens/s is over the single-token steps, the first token's time includes the prefill."""
  generator = Generator(model, absorb=absorb)
  params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
  generator.generate([prompt], params)  # Compiles prefill and the step.
  first, steps, totals, outputs = [], [], [], None
  for _ in range(repeats):
    stamps = []
    start = time.perf_counter()
    outputs = generator.generate([prompt], params, on_tokens=lambda *_: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    first.append(stamps[0] - start)
    if len(stamps) > 1:
      steps.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    totals.append(end - start)
  # The fastest repeat is reported (other load on the machine only adds time); the median is kept alongside.
  step_s = min(steps) if steps else float("nan")
  median_step_s = statistics.median(steps) if steps else float("nan")
  return {"tokens_per_s": 1.0 / step_s, "step_s": step_s, "median_tokens_per_s": 1.0 / median_step_s,
          "repeat_step_s": steps,
          "first_token_s": min(first), "total_s": min(totals),
          "new_tokens": len(outputs[0]), "prompt_tokens": len(prompt), "form": "absorbed" if absorb else "expanded",
          "output_ids": outputs[0]}


# ---------------------------------------------------------------------------------------------- curves and loss
def per_batch_val_nll(cfg: ml_collections.ConfigDict, state: dict, batches: list[dict]) -> np.ndarray:
  """Mean NLL of each validation batch (nats/token)."""
  graphdef = nnx.split(build_model(cfg.model), nnx.Param, ...)[0]
  eval_step = make_eval_step(graphdef)
  return np.array([float(eval_step(state["params"], state["model_state"], b)) / b["targets"].size for b in batches])


def plot_losses(metrics: dict[str, dict], path: Path, title: str) -> None:
  from matplotlib.figure import Figure  # No pyplot: no global state, no display needed.
  fig = Figure(figsize=(11, 4.2), layout="constrained")
  axes = fig.subplots(1, 2)
  colors = {"mha": "tab:blue", "mla": "tab:orange"}
  for name, splits in metrics.items():
    train_points = [(s, r["loss"]) for s, r in splits.get("train", []) if r.get("loss") is not None]
    val_points = [(s, r["loss"]) for s, r in splits.get("val", []) if r.get("loss") is not None]
    if train_points:
      axes[0].plot(*zip(*train_points), color=colors[name], label=name.upper(), linewidth=1.2)
    if val_points:
      axes[1].plot(*zip(*val_points), color=colors[name], label=name.upper(), marker="o")
  for ax, what in zip(axes, ("training loss", "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} (nats/token)")
    ax.set_title(what)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.savefig(path, dpi=120)


def plot_memory(models: dict[str, dict], path: Path, title: str) -> None:
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
    ratio = f"{b / a:.3f}" if a and math.isfinite(a) and math.isfinite(b) else "n/a"
    return (label, fmt(a), fmt(b), ratio)

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
  ]


def markdown_table(rows: list[tuple[str, ...]]) -> str:
  return _markdown_table(("metric", "MHA", "MLA", "MLA/MHA"), rows, left=1)


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
      f"({cfg['mla']['kv_lora_rank']} < d_model {cfg['d_model']}), so this MLA really compresses (the seed's did not).")
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
  within = abs(loss["mean"]) <= 2 * loss["standard_error"]
  verdict = ("within two standard errors of zero" if within else
             f"{'worse' if loss['mean'] > 0 else 'better'} for MLA by more than two standard errors")
  out.append(
      f"**Quality.** After {report['steps']} steps the validation loss is {mha['final_val_loss']:.4f} (MHA) and "
      f"{mla['final_val_loss']:.4f} (MLA) nats/token. The paired difference MLA - MHA over the same "
      f"{loss['batches']} validation batches is {loss['mean']:+.4f} +- {loss['standard_error']:.4f} (standard "
      f"error), {verdict}. That error covers the choice of validation text only: each model was trained once, with "
      "one seed, so seed-to-seed variation is not measured and a difference of a few hundredths of a nat may be "
      f"noise of that kind. MLA has {mla['parameters']['attention'] / mha['parameters']['attention']:.2f}x MHA's "
      "attention parameters here, so the comparison is at equal width, not equal parameters.")
  return out


def write_report(report: dict, out_dir: Path) -> None:
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
      markdown_table(rows), "",
      "![loss curves](loss_curves.png)", "", "![memory](memory.png)", "",
      "## Discussion", "",
  ]
  lines += [f"- {p}" for p in discussion(report)]
  lines += [
      "", "## How each number was obtained", "",
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
      "- Loss: final validation loss from the training loop; curves from metrics.jsonl.",
      "", f"Machine: {report['machine']}. Study wall time: {report['wall_time_s'] / 60:.1f} min.", "",
  ]
  (out_dir / "report.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------- the study
def run_study(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """Trains both models (resuming if rerun), measures them, and writes report.md, report.json, loss_curves.png
  and memory.png into `config.study.out_dir`. Returns the report dict (what report.json holds)."""
  started = time.perf_counter()
  check_study_config(config)
  s = config.study
  out_dir = Path(s.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cfgs = {name: config[name] for name in MODELS}

  # Checked before training, so a broken count never costs an hour.
  params = {name: parameter_report(cfg.model) for name, cfg in cfgs.items()}

  results = {}
  for name, cfg in cfgs.items():
    print(f"== training {name.upper()} in {cfg.train.workdir}", flush=True)
    results[name] = train(cfg, progress=progress)

  stages = ["KV cache", "training memory", "step time", "decode", "validation"]
  interactive = sys.stderr.isatty()
  bar = tqdm(total=len(stages), desc="measure", unit="stage", disable=not progress, dynamic_ncols=True,
             mininterval=0.1 if interactive else 30.0)
  models: dict[str, dict[str, Any]] = {name: {"parameters": params[name]} for name in MODELS}
  try:
    bar.set_description("measure: KV cache")
    for name, cfg in cfgs.items():
      models[name]["kv_cache"] = kv_cache_report(cfg.model, s.long_context, s.long_context_batch)
      models[name]["flops_per_token"] = accounting.flops_per_token(cfg.model, cfg.data.max_length)
    bar.update(1)

    bar.set_description("measure: training memory")
    for name, cfg in cfgs.items():
      models[name]["train_memory_long_context"] = training_memory(cfg, s.long_context, s.long_context_batch)
    bar.update(1)

    bar.set_description("measure: step time")
    timing = time_train_steps(cfgs, s.timing_windows, s.timing_steps, bar=bar)
    for name, cfg in cfgs.items():
      models[name]["step_time_s"] = timing[name]["step_time_s"]
      models[name]["step_time_min_s"] = timing[name]["step_time_min_s"]
      models[name]["step_window_times_s"] = timing[name]["window_times_s"]
      models[name]["train_memory_train_shape"] = timing[name]["memory"]
    bar.update(1)

    bar.set_description("measure: decode")
    data_dir = prepare(cfgs["mha"].data, cfgs["mha"].model.vocab_size)
    prompt = pipeline.eval_batches(data_dir, s.decode_prompt, 1, 1)[0]["inputs"][0].tolist()
    for name, cfg in cfgs.items():
      state = results[name].state
      graphdef = nnx.split(build_model(cfg.model), nnx.Param, ...)[0]
      model = nnx.merge(graphdef, state["params"], state["model_state"])
      models[name]["decode"] = time_decode(model, prompt, s.decode_tokens, s.decode_repeats,
                                           absorb=bool(cfg.decode.absorb))
    bar.update(1)

    bar.set_description("measure: validation")
    batches = pipeline.eval_batches(data_dir, cfgs["mha"].data.max_length, cfgs["mha"].train.batch_size,
                                    cfgs["mha"].train.eval_batches)
    per_batch = {name: per_batch_val_nll(cfg, results[name].state, batches) for name, cfg in cfgs.items()}
    bar.update(1)
  finally:
    bar.close()

  metrics = {name: read_metrics(cfg.train.workdir) for name, cfg in cfgs.items()}
  tokens_per_step = cfgs["mha"].train.batch_size * cfgs["mha"].train.grad_accum_steps * cfgs["mha"].data.max_length
  for name in MODELS:
    rates = [r["tokens_per_s"] for _, r in metrics[name].get("train", []) if r.get("tokens_per_s")]
    models[name]["step_time_s_metrics"] = tokens_per_step / statistics.median(rates) if rates else float("nan")
    models[name]["final_val_loss"] = results[name].val_loss
    models[name]["steps_trained"] = int(results[name].state["step"])
    models[name]["last_logged_step"] = max(step for split in metrics[name].values() for step, _ in split)
    models[name]["val_curve"] = [(step, r["loss"]) for step, r in metrics[name].get("val", [])]
    models[name]["workdir"] = str(cfgs[name].train.workdir)

  diff = per_batch["mla"] - per_batch["mha"]
  m_cfg, mla_cfg = cfgs["mha"].model, cfgs["mla"].model
  report = {
      "name": cfgs["mha"].name.replace("mla_vs_mha/mha", "mla_vs_mha"),
      "machine": machine(),
      "steps": cfgs["mha"].train.steps,
      "unigram_val_loss": results["mha"].unigram_loss,
      "config": {
          "d_model": m_cfg.d_model, "num_layers": m_cfg.num_layers, "num_heads": m_cfg.num_heads,
          "head_dim": head_dim(m_cfg), "d_ff": m_cfg.d_ff,
          "vocab_size": m_cfg.vocab_size, "max_seq_len": m_cfg.max_seq_len, "seed": cfgs["mha"].train.seed,
          "data_seed": cfgs["mha"].data.seed, "batch_size": cfgs["mha"].train.batch_size,
          "learning_rate": cfgs["mha"].train.learning_rate,
          "mla": {k: mla_cfg[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                          "v_head_dim")},
      },
      "study": dict(s.to_dict(), train_shape=f"{cfgs['mha'].train.batch_size} x {cfgs['mha'].data.max_length}"),
      "models": models,
      "ratios": {
          "kv_cache_mha_over_mla": models["mha"]["kv_cache"]["bytes_per_token"] /
                                   models["mla"]["kv_cache"]["bytes_per_token"],
          "kv_cache_mla_over_mha": models["mla"]["kv_cache"]["bytes_per_token"] /
                                   models["mha"]["kv_cache"]["bytes_per_token"],
      },
      "loss_difference": {"mean": float(diff.mean()), "batches": int(diff.size),
                          "standard_error": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else
                          float("nan")},
      "files": ["report.md", "report.json", "loss_curves.png", "memory.png"],
  }
  title = f"MHA vs MLA ({report['name']})"
  plot_losses(metrics, out_dir / "loss_curves.png", title)
  plot_memory(models, out_dir / "memory.png", title)
  report["wall_time_s"] = time.perf_counter() - started
  return save_report(report, out_dir, headline_rows, write_report)


if __name__ == "__main__":
  run_cli(run_study, "configs/mla_vs_mha.py:tiny", markdown_table)
