"""Training throughput of a config on this machine: tokens/s and model FLOPs utilisation.

  python benchmarks/train_throughput.py --config=configs/gpt2_small.py:tiny [--steps=20] [--compute_dtype=bfloat16]

Times the real jitted train step (forward, backward, AdamW update) on random tokens, after compilation and
warm-up, and reports the median over `--repeats` timed windows. MFU = tokens/s x FLOPs/token (PaLM appendix B)
/ the device's peak (datasheet for accelerators; a measured float32 matmul on CPU).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import machine  # noqa: E402
from superlm_jax.cli import run_main  # noqa: E402
from superlm_jax.models import accounting  # noqa: E402
from superlm_jax.models.transformer import build_model  # noqa: E402
from superlm_jax.training import metrics  # noqa: E402
from superlm_jax.training.optim import make_optimizer  # noqa: E402
from superlm_jax.models.options import RuntimeOptions  # noqa: E402
from superlm_jax.training.moe_balancing import MoEBalancing  # noqa: E402
from superlm_jax.training.step import init_train_state, make_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt2_small.py:tiny", "Config file[:preset].",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows (the median is reported).")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"], "Override train.compute_dtype.")
_JSON = flags.DEFINE_string("json", None, "Also write the result to this JSON file.")


def main(argv):
  del argv
  config = _CONFIG.value
  m, t = config.model, config.train
  dtype_name = _DTYPE.value or t.compute_dtype
  model = build_model(m, seed=0, compute_dtype=dtype_name, options=RuntimeOptions(remat=t.remat))
  tx = make_optimizer(t, model)
  graphdef, state = init_train_state(model, tx, seed=0)
  step = make_train_step(graphdef, tx, moe=MoEBalancing.from_config(t), loss_chunk_size=t.loss_chunk_size)
  seq = config.data.max_length
  shape = (t.grad_accum_steps, t.batch_size, seq)
  tokens = jax.random.randint(jax.random.key(0), shape, 0, m.vocab_size)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=-1)}

  for _ in range(2):  # compile + warm-up
    state, out = step(state, batch)
  jax.block_until_ready(out)
  windows = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, out = step(state, batch)
    jax.block_until_ready(out)
    windows.append((time.perf_counter() - start) / _STEPS.value)
  step_time = statistics.median(windows)
  tokens_per_step = t.grad_accum_steps * t.batch_size * seq
  tokens_per_s = tokens_per_step / step_time
  flops_per_token = accounting.flops_per_token(m, seq)
  peak, peak_source = metrics.peak_flops_total()
  result = {
      "config": config.name, "compute_dtype": dtype_name, "parameters": accounting.parameter_count(m)["total"],
      "active_parameters": accounting.parameter_count(m)["active"],
      "moe_dispatch": m.moe_dispatch if m.n_routed_experts else None,
      "batch": list(shape), "step_time_s": step_time, "tokens_per_s": tokens_per_s,
      "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12, "peak_tflops": peak / 1e12,
      "peak_source": peak_source, "mfu": metrics.mfu(tokens_per_s, flops_per_token, peak),
      "machine": machine.describe(),
  }
  print(f"machine: {result['machine']}")
  print(f"{config.name} ({result['parameters']:,} params, {dtype_name}, batch {shape}): "
        f"{step_time * 1e3:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, "
        f"{result['model_tflops_per_s'] * 1e3:.1f} GFLOP/s = {100 * result['mfu']:.1f}% MFU "
        f"(peak {peak / 1e9:.0f} GFLOP/s, {peak_source})")
  if _JSON.value:
    Path(_JSON.value).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  run_main(main)
