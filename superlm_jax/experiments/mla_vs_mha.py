"""MHA vs MLA (reference project 004): the same decoder trained twice, once with multi-head attention and once with DeepSeek's
Multi-head Latent Attention, then compared on what MLA is for and what it costs.

  python -m superlm_jax.experiments.mla_vs_mha --config=configs/mla_vs_mha.py:tiny

MLA (DeepSeek-V2, arXiv 2405.04434, sec. 2.1) caches one latent c_kv of width kv_lora_rank plus one shared rotary
key per token instead of every head's keys and values, so its claim is a smaller decode cache at comparable
quality. The reference project's study compared against an "MLA" whose latent was wider than the model, which expanded the cache;
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
                  paired per-batch difference MLA - MHA on the same validation batches with its standard error
                  (`training.evaluate`: per-token NLL at one padded shape, reduced per batch, then `Average`).
  training time   each run's, summed over the invocations that trained it (`common.train_runs`).

This module measures and writes report.json; `mla_vs_mha_report` turns a report.json into report.md and the figures
(and can redo that alone: `python -m superlm_jax.experiments.mla_vs_mha_report --report=PATH`).
"""

from __future__ import annotations

import functools
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

from superlm_jax.data import pipeline
from superlm_jax.data.prepare import prepare
from superlm_jax.errors import UserError
from superlm_jax.experiments.common import (Comparison, check_comparison, machine, markdown_table, read_metrics,
                                            run_cli, save_report, train_runs, with_max_seq_len)
from superlm_jax.experiments.mla_vs_mha_report import HEADLINE_HEADER, headline_rows, write_report
from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.models import accounting
from superlm_jax.models.spec import ModelSpec, parse_dtype
from superlm_jax.models.transformer import abstract_model, build_model
from superlm_jax.training.evaluate import Average, make_token_nll, pad_rows
from superlm_jax.training.optim import make_optimizer
from superlm_jax.training.step import init_train_state, make_train_step, split_model

# The comparison, declared once (configs/mla_vs_mha.py builds its sections from it): the runs differ only in the
# attention kind and the MLA ranks, which MHA does not read, and in their run directories.
COMPARISON = Comparison(
    runs=("mha", "mla"),
    may_differ=(("model", ("attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                           "v_head_dim")),
                ("train", ("workdir",))))
MLA_RANKS = tuple(key for key in COMPARISON.keys_that_may_differ("model") if key != "attention")


# ---------------------------------------------------------------------------------------------- config checks
def check_study_config(config: ml_collections.ConfigDict) -> None:
  """UserError unless the two runs are a controlled comparison (`COMPARISON`) of an MHA and an MLA model, and the
  study's measurements fit the models."""
  check_comparison(config, COMPARISON)
  mha, mla = config.mha, config.mla
  if mha.model.attention != "mha" or mla.model.attention != "mla":
    raise UserError("study: mha.model.attention must be 'mha' and mla.model.attention 'mla'")
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
  """{'total', 'attention'}: what the built model (or its `nnx.eval_shape`) holds."""
  attention = sum(_leaf_count(nnx.state(block.attn, nnx.Param)) for block in model.block_modules())
  return {"total": _leaf_count(nnx.state(model, nnx.Param)), "attention": attention}


def parameter_report(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Accounting's counts next to the built model's; RuntimeError if they disagree (a bug in one of them). The
  model is built abstractly (`nnx.eval_shape`): only the shapes count."""
  counted = {"total": accounting.parameter_count(cfg)["total"], "attention": accounting.attention_parameter_count(cfg)}
  built = built_parameter_counts(abstract_model(cfg))
  if counted != built:
    raise RuntimeError(f"accounting {counted} disagrees with the built model {built}")
  return {"total": counted["total"], "attention": counted["attention"], "built_total": built["total"],
          "built_attention": built["attention"], "checked": True}


# ---------------------------------------------------------------------------------------------- memory
def kv_cache_report(cfg: ml_collections.ConfigDict, tokens: int, batch: int) -> dict[str, Any]:
  """bf16 cache per token from accounting, checked against the shapes `init_cache` allocates (never allocated:
  model and cache are both built under `jax.eval_shape`)."""
  per_token = accounting.kv_cache_bytes_per_token(cfg, bytes_per_value=2)
  long_cfg = with_max_seq_len(cfg, max(cfg.max_seq_len, tokens))
  cache = jax.eval_shape(lambda: build_model(long_cfg).init_cache(batch, tokens, jnp.bfloat16))
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


def _train_step_for(cfg: ml_collections.ConfigDict, max_seq_len: int | None = None, abstract: bool = False):
  """(jitted train step, a fresh train state) of a config's model; max_seq_len overrides the model's. With
  `abstract` the state is only its shapes (`jax.eval_shape`), enough to compile the step."""
  model_cfg = cfg.model if max_seq_len is None else with_max_seq_len(cfg.model, max_seq_len)
  make_model = functools.partial(build_model, model_cfg, seed=cfg.train.seed,
                                 compute_dtype=parse_dtype(cfg.train.compute_dtype))
  shapes = nnx.eval_shape(make_model)
  tx = make_optimizer(cfg.train, shapes)
  init = lambda: init_train_state(make_model(), tx, cfg.train.seed)[1]
  state = jax.eval_shape(init) if abstract else init()
  return make_train_step(split_model(shapes)[0], tx, label_smoothing=cfg.train.label_smoothing), state


def _batch_spec(batch: int, seq: int) -> dict:
  spec = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
  return {"inputs": spec, "targets": spec}


def training_memory(cfg: ml_collections.ConfigDict, seq: int, batch: int) -> dict[str, int]:
  """Compiles (never runs) the train step for a [1, batch, seq] batch and reads its buffer assignment."""
  step, abstract_state = _train_step_for(cfg, max_seq_len=max(cfg.model.max_seq_len, seq), abstract=True)
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


# ---------------------------------------------------------------------------------------------- validation loss
def per_batch_val_nll(cfg: ml_collections.ConfigDict, state: dict, batches: list[dict]) -> np.ndarray:
  """Mean NLL (nats/token) of each validation batch, so the two models' batches pair up: `training.evaluate`'s
  per-token NLL at the shape of a full batch (a smaller last batch is padded; its padding rows weigh 0), averaged
  over each batch's real tokens."""
  graphdef = split_model(abstract_model(cfg.model))[0]
  nll_fn = make_token_nll(graphdef)
  means = []
  for batch in batches:
    padded, weights = pad_rows(batch, cfg.train.batch_size)
    nll = np.asarray(nll_fn(state["params"], state["model_state"], {k: jnp.asarray(v) for k, v in padded.items()}))
    means.append(Average().add(nll, weights[:, None]).mean)
  return np.array(means)


# ---------------------------------------------------------------------------------------------- the study
def run_study(config: ml_collections.ConfigDict, progress: bool = True) -> dict:
  """Trains both models (resuming if rerun), measures them, and writes report.json into `config.study.out_dir`
  (plus train_times.json, each run's training time summed over the invocations that trained it), with report.md,
  loss_curves.png and memory.png drawn from it by `mla_vs_mha_report.write_report`. Returns the report dict (what
  report.json holds)."""
  started = time.perf_counter()
  check_study_config(config)
  s = config.study
  out_dir = Path(s.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cfgs = {name: config[name] for name in COMPARISON.runs}
  ref = cfgs["mha"]

  # Checked before training, so a broken count never costs an hour.
  params = {name: parameter_report(cfg.model) for name, cfg in cfgs.items()}

  results, train_times = train_runs(cfgs, out_dir, progress)

  stages = ["KV cache", "training memory", "step time", "decode", "validation"]
  interactive = sys.stderr.isatty()
  bar = tqdm(total=len(stages), desc="measure", unit="stage", disable=not progress, dynamic_ncols=True,
             mininterval=0.1 if interactive else 30.0)
  models: dict[str, dict[str, Any]] = {name: {"parameters": params[name]} for name in cfgs}
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
    for name in cfgs:
      models[name]["step_time_s"] = timing[name]["step_time_s"]
      models[name]["step_time_min_s"] = timing[name]["step_time_min_s"]
      models[name]["step_window_times_s"] = timing[name]["window_times_s"]
      models[name]["train_memory_train_shape"] = timing[name]["memory"]
    bar.update(1)

    bar.set_description("measure: decode")
    data_dir = prepare(ref.data, ref.model.vocab_size)
    prompt = pipeline.eval_batches(data_dir, s.decode_prompt, 1, 1)[0]["inputs"][0].tolist()
    for name, cfg in cfgs.items():
      state = results[name].state
      graphdef = split_model(abstract_model(cfg.model))[0]
      model = nnx.merge(graphdef, state["params"], state["model_state"])
      models[name]["decode"] = time_decode(model, prompt, s.decode_tokens, s.decode_repeats,
                                           absorb=bool(cfg.decode.absorb))
    bar.update(1)

    bar.set_description("measure: validation")
    batches = pipeline.eval_batches(data_dir, ref.data.max_length, ref.train.batch_size, ref.train.eval_batches)
    per_batch = {name: per_batch_val_nll(cfg, results[name].state, batches) for name, cfg in cfgs.items()}
    bar.update(1)
  finally:
    bar.close()

  metrics = {name: read_metrics(cfg.train.workdir) for name, cfg in cfgs.items()}
  tokens_per_step = ref.train.batch_size * ref.train.grad_accum_steps * ref.data.max_length
  for name in cfgs:
    rates = [r["tokens_per_s"] for _, r in metrics[name].get("train", []) if r.get("tokens_per_s")]
    models[name]["step_time_s_metrics"] = tokens_per_step / statistics.median(rates) if rates else float("nan")
    models[name]["final_val_loss"] = results[name].val_loss
    models[name]["train_time_s"] = train_times[name]
    models[name]["steps_trained"] = int(results[name].state["step"])
    models[name]["last_logged_step"] = max(step for split in metrics[name].values() for step, _ in split)
    models[name]["train_curve"] = [(step, r["loss"]) for step, r in metrics[name].get("train", [])
                                   if r.get("loss") is not None]
    models[name]["val_curve"] = [(step, r["loss"]) for step, r in metrics[name].get("val", [])]
    models[name]["workdir"] = str(cfgs[name].train.workdir)

  m_cfg, mla_cfg = ref.model, cfgs["mla"].model
  kv_bytes = {name: models[name]["kv_cache"]["bytes_per_token"] for name in cfgs}
  report = {
      "name": ref.name.replace("mla_vs_mha/mha", "mla_vs_mha"),
      "machine": machine(),
      "steps": ref.train.steps,
      "unigram_val_loss": results["mha"].unigram_loss,
      "config": {
          "d_model": m_cfg.d_model, "num_layers": m_cfg.num_layers, "num_heads": m_cfg.num_heads,
          "head_dim": ModelSpec.from_config(m_cfg).head_dim, "d_ff": m_cfg.d_ff,
          "vocab_size": m_cfg.vocab_size, "max_seq_len": m_cfg.max_seq_len, "seed": ref.train.seed,
          "data_seed": ref.data.seed, "batch_size": ref.train.batch_size,
          "learning_rate": ref.train.learning_rate,
          "mla": {k: mla_cfg[k] for k in MLA_RANKS},
      },
      "study": dict(s.to_dict(), train_shape=f"{ref.train.batch_size} x {ref.data.max_length}"),
      "models": models,
      "ratios": {"kv_cache_mha_over_mla": kv_bytes["mha"] / kv_bytes["mla"],
                 "kv_cache_mla_over_mha": kv_bytes["mla"] / kv_bytes["mha"]},
      # Paired over the same validation batches: the error is that of the choice of validation text.
      "loss_difference": Average().add(per_batch["mla"] - per_batch["mha"]).to_json(),
      "files": ["report.md", "report.json", "loss_curves.png", "memory.png"],
  }
  report["wall_time_s"] = time.perf_counter() - started
  return save_report(report, out_dir, headline_rows, write_report)


if __name__ == "__main__":
  run_cli(run_study, "configs/mla_vs_mha.py:tiny", functools.partial(markdown_table, HEADLINE_HEADER))
