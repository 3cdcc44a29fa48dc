"""The model-level parts of benchmarks/device_suite.py: a bf16 train step of a 342M Llama (tokens/s, MFU, peak
memory) and decode tokens/s of two MLA models, the XLA path against the Pallas kernel. See benchmarks/device_parts.py
for the `Part` record these fill.
"""

from __future__ import annotations

import importlib.util
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.device_parts import REPO, Part, peak_bytes_in_use, rate
from superlm_jax.config import base_config, validate
from superlm_jax.models import accounting
from superlm_jax.models.transformer import build_model


def load_preset(config_file: str, preset: str) -> ml_collections.ConfigDict:
  """configs/FILE.py:PRESET without absl flags (the suite's parts parse no flags)."""
  spec = importlib.util.spec_from_file_location("device_suite_config", REPO / config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


# ------------------------------------------------------------------------------------------------ train step
# The memory and speed settings of the train step: memory-efficient attention (whatever `auto` picks on the chip),
# one compiled block for all layers, and matmul outputs saved for the backward pass (the 350m step fits an H200
# that way, and recomputes less than full remat).
TRAIN_OPTIONS = {("model", "attention_impl"): "auto", ("model", "scan_layers"): True,
                 ("train", "remat"): "dots_saveable"}


def apply_train_options(config: ml_collections.ConfigDict) -> dict:
  """Sets TRAIN_OPTIONS; returns {section.key: value} of every memory-related setting in force."""
  for (section, key), value in TRAIN_OPTIONS.items():
    config[section][key] = value
  keys = (*TRAIN_OPTIONS, ("train", "loss_chunk_size"))
  return {f"{section}.{key}": config[section][key] for section, key in keys}


def train_step_part(part: Part) -> None:
  """Tokens/s, MFU and peak memory of the jitted train step (forward, backward, AdamW) on random tokens, built by
  the same functions as benchmarks/train_throughput.py. If the compiled step's memory would not fit the device,
  the same 8 x 2048 tokens are split into more micro-batches (gradient accumulation) and that is recorded."""
  from superlm_jax.training import metrics
  from superlm_jax.training.optim import make_optimizer
  from superlm_jax.models.options import RuntimeOptions
  from superlm_jax.training.moe_balancing import MoEBalancing
  from superlm_jax.training.step import init_train_state, make_train_step

  if part.smoke:
    config = load_preset("configs/llama_dense.py", "tiny")
    config.model.update(num_layers=1, max_seq_len=64)
    config.data.max_length, config.train.batch_size = 64, 2
  else:
    config = load_preset("configs/llama_dense.py", "350m")
  config.train.compute_dtype = "bfloat16"
  options = apply_train_options(config)
  validate(config)
  m, t = config.model, config.train
  seq, rows = config.data.max_length, t.batch_size
  flops_per_token = accounting.flops_per_token(m, seq)
  part.result["figures"].update(config=config.name, options=options, model=m.to_dict(), train=t.to_dict(),
                                parameters=accounting.parameter_count(m)["total"], flops_per_token=flops_per_token)
  part.save()

  model = build_model(m, seed=0, compute_dtype=jnp.bfloat16, options=RuntimeOptions(remat=t.remat))
  tx = make_optimizer(t, model)
  graphdef, state = init_train_state(model, tx, seed=0)
  del model
  step_kwargs = {"label_smoothing": t.label_smoothing, "loss_chunk_size": t.loss_chunk_size}
  step = make_train_step(graphdef, tx, moe=MoEBalancing.from_config(t), **step_kwargs)
  part.result["figures"]["make_train_step_kwargs"] = step_kwargs
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # None on CPU

  compiled: dict = {}  # the executable and its batch, for the micro-batching that fits

  def compile_for(accum: int) -> dict:
    shape = (accum, rows // accum, seq)
    tokens = jax.random.randint(jax.random.key(0), shape, 0, m.vocab_size)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=-1)}
    start = time.perf_counter()
    compiled.update(step=step.lower(state, batch).compile(), batch=batch)
    memory = compiled["step"].memory_analysis()
    need = None if memory is None else (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                        - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return {"batch": list(shape), "compile_s": time.perf_counter() - start, "bytes_needed": need,
            "temp_bytes": None if memory is None else memory.temp_size_in_bytes}

  info = None
  for accum in (1, 2, 4, 8):  # 8 x 2048 as 1 x 8, then 2 x 4, ... micro-batches until the step fits
    if rows % accum:
      break
    info = part.attempt(f"compile_accum{accum}", lambda: compile_for(accum), needs_s=5 if part.smoke else 30)
    if info is None or limit is None or info["bytes_needed"] is None or info["bytes_needed"] <= 0.95 * limit:
      break
    print(f"  {info['bytes_needed'] / 2**30:.1f} GiB needed > {limit / 2**30:.1f} GiB: more micro-batches")
    info = None
  if info is None:
    raise RuntimeError("the train step did not compile to fit the device's memory (see errors)")
  run_step, batch = compiled["step"], compiled["batch"]

  steps, windows = (2, 2) if part.smoke else (10, 3)

  def timing():
    nonlocal state
    for _ in range(2):  # warm-up (the first call of a compiled step allocates its buffers)
      state, out = run_step(state, batch)
    jax.block_until_ready(out)
    samples = []
    for _ in range(windows):
      start = time.perf_counter()
      for _ in range(steps):
        state, out = run_step(state, batch)
      jax.block_until_ready(out)
      samples.append((time.perf_counter() - start) / steps)
    step_s = float(np.median(samples))
    tokens_per_s = rows * seq / step_s
    peak, peak_source = metrics.peak_flops_total()
    return {"batch": info["batch"], "step_s": step_s, "samples_s": samples, "tokens_per_s": tokens_per_s,
            "model_flops_per_s": tokens_per_s * flops_per_token, "peak_flops": peak, "peak_source": peak_source,
            "mfu": metrics.mfu(tokens_per_s, flops_per_token, peak), "loss": float(out["loss"]),
            "peak_bytes_in_use": peak_bytes_in_use(), "bytes_limit": limit}
  result = part.attempt("step", timing)
  if result:
    label = f"train step {config.name}, bf16, {rows} x {seq} as {result['batch'][0]} micro-batch(es)"
    part.row(f"{label}: throughput", f"{result['tokens_per_s']:,.0f} tokens/s, {result['step_s'] * 1e3:,.1f} ms/step")
    part.row(f"{label}: MFU", f"{result['mfu']:.1%} of {rate(result['peak_flops'], 'FLOP/s')}",
             ">= 50%", result["mfu"] >= 0.5)
    peak_mem = result["peak_bytes_in_use"]
    part.row(f"{label}: peak memory", "n/a" if peak_mem is None else f"{peak_mem / 2**30:,.1f} GiB"
             + ("" if not limit else f" of {limit / 2**30:,.0f}"))
    part.row(f"{label}: options", ", ".join(f"{k}={v}" for k, v in options.items()
                                           if v != "absent from the config") or "none of the memory options exist yet")


# ------------------------------------------------------------------------------------------------ decode
def deepseek_v3_sixteenth(smoke: bool) -> ml_collections.ConfigDict:
  """DeepSeek-V3's attention at 1/16 of its width: d 7168 -> 448, 128 -> 8 heads, 61 -> 4 layers, q_lora 1536 ->
  96, vocab ~129k -> 8192, FFN 18432 -> 1152; the per-head and latent widths (nope 128, rope 64, v 128,
  kv_lora 512) stay, because they are what the decode cache and the kernel see. Dense FFNs instead of V3's MoE:
  this part compares attention paths, and routing would add the same cost to both."""
  c = base_config().model
  c.update(attention="mla", norm="rmsnorm", positions="rope", mlp="swiglu", use_bias=False, tie_embeddings=False,
           norm_eps=1e-6, vocab_size=8192, d_model=448, num_heads=8, num_layers=4, d_ff=1152, max_seq_len=4096,
           q_lora_rank=96, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
  if smoke:
    c.update(d_model=64, num_heads=4, num_layers=1, d_ff=128, vocab_size=512, max_seq_len=128, q_lora_rank=16,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
  return c


def decode_models(smoke: bool) -> dict[str, tuple[str, ml_collections.ConfigDict, int, int]]:
  """{role: (config name, model config, prompt length, new tokens)}."""
  mini = load_preset("configs/minideepseek.py", "tiny" if smoke else "small")
  if smoke:
    mini.model.num_layers = 1
  return {
      "minideepseek": (mini.name, mini.model, 16 if smoke else 512, 4 if smoke else 64),
      "deepseek_v3_sixteenth": ("deepseek_v3/16 (dense FFN)", deepseek_v3_sixteenth(smoke), 16 if smoke else 2048,
                                4 if smoke else 64),
  }


def decode_part(part: Part) -> None:
  """Greedy decode tokens/s (bf16, random weights) of each model at batch 1 and 64, absorbed MLA through the XLA
  einsums and through the Pallas kernel (`Generator(decode_impl=...)`), timed by benchmarks/decode.py's
  `timed_run` (clocks read once each token is on the host)."""
  from benchmarks.decode import summarise, timed_run
  from superlm_jax.generate.decode import Generator, SamplingParams

  batches, repeats = ((2,), 1) if part.smoke else ((1, 64), 2)
  for role, (name, m, prompt_len, new) in decode_models(part.smoke).items():
    model = build_model(m, seed=0, compute_dtype=jnp.bfloat16)
    # The kernel first: its first trace imports Pallas modules that (jax 0.11) add a config option to the tracing
    # context, which makes every jit compiled before it compile again at its next call.
    generators = {impl: Generator(model, decode_impl=impl) for impl in ("pallas", "xla")}
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    for batch in batches:
      def measure(batch=batch):
        prompts = np.random.default_rng(batch).integers(0, m.vocab_size, (batch, prompt_len)).tolist()
        runs = {impl: [] for impl in generators}
        # Two untimed rounds (the second recompiles whatever the first round's Pallas imports made stale), then
        # timed ones, interleaved so that load drift hits both paths alike.
        for rep in range(repeats + 2):
          for impl, gen in generators.items():
            run = timed_run(lambda cb, gen=gen: gen.generate(prompts, params, on_tokens=cb))
            if rep >= 2:
              runs[impl].append(run)
        out = {"config": name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new,
               "kv_lora_rank": m.kv_lora_rank, "rope_dim": m.qk_rope_head_dim, "heads": m.num_heads}
        for impl, impl_runs in runs.items():
          summary = summarise(impl_runs)
          summary["tokens_per_s"] = batch / summary["per_token_s"]
          out[impl] = summary
        xla_tokens, pallas_tokens = (np.asarray(out[impl].pop("tokens")) for impl in ("xla", "pallas"))
        out["tokens_match"] = float((xla_tokens == pallas_tokens).mean())  # bf16 rounding may flip a near-tie
        out["speedup_vs_xla"] = out["xla"]["per_token_s"] / out["pallas"]["per_token_s"]
        return out
      result = part.attempt(f"{role}_batch{batch}", measure, needs_s=3 if part.smoke else 10)
      if result:
        part.row(f"decode {name}, batch {batch}, prompt {prompt_len} + {new}, bf16",
                 f"XLA {result['xla']['tokens_per_s']:,.0f} vs kernel {result['pallas']['tokens_per_s']:,.0f} "
                 f"tokens/s ({result['speedup_vs_xla']:.2f}x; tokens {result['tokens_match']:.0%} equal)")
