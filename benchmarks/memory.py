"""Compile time and XLA's memory analysis of the real train step and prefill, from abstract shapes only.

  python benchmarks/memory.py --config=configs/llama_dense.py:smollm2 [--batch=8] [--seq=2048]
      [--compute_dtype=bfloat16] [--skip_prefill] [--json=out.json] [--config.train.grad_accum_steps=2 ...]

Nothing is allocated: the train state is abstract (`jax.eval_shape` of `init_train_state`, the model built under
`nnx.eval_shape`), the batch is `jax.ShapeDtypeStruct`s, and the step is lowered and compiled for those shapes
(`step.lower(state, batch).compile()`), so a step that needs 100+ GB runs through XLA's buffer assignment on a
24 GB laptop. The step is the training loop's own (superlm_jax/training/loop.py): `build_model`, `make_optimizer`,
`init_train_state`, `make_train_step` on the config's mesh (one device: the plain program), batch
[grad_accum, micro_batch, seq], the old state donated. Prefill is the model's forward over [micro_batch, seq]
prompt tokens writing a decode cache of `--cache_len` slots (default model.max_seq_len) from `model.init_cache`,
the cache donated, as the Generator's prefill does (superlm_jax/generate/decode.py); it returns the last position's
logits and the cache.

For each program it reports the seconds to trace + lower and to compile, and `compiled.memory_analysis()`:
temporaries (XLA's buffers live inside the program: activations kept for the backward, logits, gradients...),
arguments, outputs, aliased bytes (outputs written into donated arguments) and generated code (0 on XLA:CPU), per
device: on fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 with e.g. --config.mesh.fsdp=8) the
train step's figures are one device's share (the prefill, like the Generator, is unsharded).
`peak_estimate_bytes` = arguments + outputs - aliased + temporaries: the device memory the call needs at its busiest
if nothing else is resident. The memory-related config keys in force (model.attention_impl, model.scan_layers,
train.remat, train.loss_chunk_size, where the library has them) are recorded with the figures. Compiling even a
500 GB step takes seconds to a minute on 2 CPU cores and about 1 GB of host RAM (`host_peak_rss_bytes`).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import machine  # noqa: E402
from superlm_jax import sharding  # noqa: E402
from superlm_jax.cli import run_main  # noqa: E402
from superlm_jax.config import validate  # noqa: E402
from superlm_jax.errors import UserError  # noqa: E402
from superlm_jax.models import accounting  # noqa: E402
from superlm_jax.models.options import RuntimeOptions  # noqa: E402
from superlm_jax.models.spec import ModelSpec, parse_dtype  # noqa: E402
from superlm_jax.models.transformer import abstract_model, build_model  # noqa: E402
from superlm_jax.training.optim import make_optimizer  # noqa: E402
from superlm_jax.training.moe_balancing import MoEBalancing  # noqa: E402
from superlm_jax.training.step import init_train_state, make_train_step, split_model  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt2_small.py:tiny", "Config file[:preset].",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch", None, "Rows per micro-batch (default train.batch_size); the step's batch is "
                              "[train.grad_accum_steps, batch, seq].")
_SEQ = flags.DEFINE_integer("seq", None, "Tokens per row (default data.max_length).")
_CACHE_LEN = flags.DEFINE_integer("cache_len", None, "Prefill: decode-cache slots (default model.max_seq_len).")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"], "Override train.compute_dtype.")
_SKIP_PREFILL = flags.DEFINE_bool("skip_prefill", False, "Compile the train step only.")
_JSON = flags.DEFINE_string("json", None, "Also write the result to this JSON file.")

# Config keys that change how much memory the step needs, recorded when the library defines them.
MEMORY_KEYS = ("model.attention_impl", "model.scan_layers", "train.remat", "train.loss_chunk_size")
# CompiledMemoryStats fields reported (device side; the host_* twins are zero on every backend we use).
STATS = {"temp_bytes": "temp_size_in_bytes", "argument_bytes": "argument_size_in_bytes",
         "output_bytes": "output_size_in_bytes", "alias_bytes": "alias_size_in_bytes",
         "generated_code_bytes": "generated_code_size_in_bytes"}


def memory_keys(config) -> dict:
  found = {}
  for path in MEMORY_KEYS:
    section, key = path.split(".")
    if key in config[section]:
      found[path] = config[section][key]
  return found


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compile_report(jitted, *args) -> dict:
  """Trace + lower and compile `jitted` for abstract `args`; the timings and XLA's memory analysis."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  stats = compiled.memory_analysis()
  report = {"trace_lower_s": lowered_at - start, "compile_s": done - lowered_at}
  for name, attr in STATS.items():
    value = getattr(stats, attr, None) if stats is not None else None
    report[name] = None if value is None else int(value)
  if stats is not None and getattr(stats, "peak_memory_in_bytes", None):
    # As reported; on XLA:CPU (jax 0.10) it can be far below the temporaries alone, so it is not the peak there.
    report["xla_reported_peak_bytes"] = int(stats.peak_memory_in_bytes)
  if report["temp_bytes"] is not None:
    report["peak_estimate_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                                     - (report["alias_bytes"] or 0) + report["temp_bytes"])
  return report


def _gb(n) -> str:
  return "n/a" if n is None else f"{n / 1e9:,.2f} GB"


def describe(name: str, r: dict) -> str:
  return (f"{name}: trace+lower {r['trace_lower_s']:.1f} s, compile {r['compile_s']:.1f} s; "
          f"temp {_gb(r['temp_bytes'])}, arguments {_gb(r['argument_bytes'])}, outputs {_gb(r['output_bytes'])}, "
          f"aliased {_gb(r['alias_bytes'])}, code {_gb(r['generated_code_bytes'])}; "
          f"peak estimate {_gb(r.get('peak_estimate_bytes'))}")


def train_step_report(config, compute_dtype, batch_shape) -> dict:
  """The training loop's step for `batch_shape` = (accum, micro_batch, seq), compiled from abstract shapes."""
  m, t = config.model, config.train
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_fits(config, mesh)
  spec = ModelSpec.from_config(m, compute_dtype)
  make_model = lambda: build_model(spec, seed=t.seed, options=RuntimeOptions(remat=t.remat))
  abstract = nnx.eval_shape(make_model)
  tx = make_optimizer(t, abstract)
  graphdef = split_model(abstract)[0]
  state = jax.eval_shape(lambda: init_train_state(make_model(), tx, t.seed)[1])
  state_shardings = sharding.state_shardings(state, mesh)
  step = make_train_step(graphdef, tx, label_smoothing=t.label_smoothing, moe=MoEBalancing.from_config(t),
                         mesh=mesh, state_shardings=state_shardings, loss_chunk_size=t.loss_chunk_size)
  tokens = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
  report = compile_report(step, state, {"inputs": tokens, "targets": tokens})
  report.update(mesh=sharding.describe(mesh), state_bytes=tree_bytes(state),
                params_bytes=tree_bytes(state["params"]), opt_state_bytes=tree_bytes(state["opt_state"]))
  return report


def prefill_report(config, compute_dtype, batch: int, seq: int, cache_len: int) -> dict:
  """The model's forward over [batch, seq] prompts into a fresh decode cache of `cache_len` slots."""
  options = RuntimeOptions(mla_form="auto" if config.decode.absorb else "expanded",  # as Generator does
                           decode_impl=config.decode.impl)
  model = abstract_model(ModelSpec.from_config(config.model, compute_dtype), options)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  cache = jax.eval_shape(lambda: model.init_cache(batch, cache_len))

  def prefill(params, rest, tokens, cache):  # as Generator._prefill_fn: the head at the last position only
    model = nnx.merge(graphdef, params, rest)
    hidden, cache = model.hidden(tokens, cache=cache)
    return (hidden[:, -1] @ model.output_head()).astype(jnp.float32), cache

  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  report = compile_report(jax.jit(prefill, donate_argnames=("cache",)), params, rest, tokens, cache)
  report.update(cache_len=cache_len, cache_bytes=tree_bytes(cache), params_bytes=tree_bytes(params))
  return report


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)  # compile times are real compiles, never cache hits
  config = _CONFIG.value
  m, t = config.model, config.train
  dtype_name = _DTYPE.value or t.compute_dtype
  t.compute_dtype = dtype_name
  if _BATCH.value:
    t.batch_size = _BATCH.value
  if _SEQ.value:
    config.data.max_length = _SEQ.value
  validate(config)
  compute_dtype = parse_dtype(dtype_name)
  batch, seq = t.batch_size, config.data.max_length
  batch_shape = (t.grad_accum_steps, batch, seq)
  cache_len = _CACHE_LEN.value or m.max_seq_len
  if not _SKIP_PREFILL.value and cache_len < seq:
    raise UserError(f"--cache_len={cache_len} is shorter than the {seq}-token prompts")

  counts = accounting.parameter_count(m)
  result = {
      "config": config.name, "compute_dtype": dtype_name, "parameters": counts["total"],
      "active_parameters": counts["active"], "batch": list(batch_shape), "memory_keys": memory_keys(config),
      "machine": machine.describe(), "jax": jax.__version__, "argv": sys.argv[1:],
      "model_config": m.to_dict(),
  }
  print(f"machine: {result['machine']}")
  keys = ", ".join(f"{k}={v!r}" for k, v in result["memory_keys"].items()) or "no memory keys in this library"
  print(f"{config.name} ({counts['total']:,} params, {dtype_name}; {keys})")
  result["train_step"] = train_step_report(config, compute_dtype, batch_shape)
  print(describe(f"train step, batch {batch_shape}", result["train_step"]))
  if not _SKIP_PREFILL.value:
    result["prefill"] = prefill_report(config, compute_dtype, batch, seq, cache_len)
    print(describe(f"prefill, batch ({batch}, {seq}) into a {cache_len}-slot cache", result["prefill"]))
  result["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  print(f"host peak RSS {_gb(result['host_peak_rss_bytes'])}")
  if _JSON.value:
    Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_JSON.value).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  run_main(main)
