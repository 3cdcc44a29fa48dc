"""Memory bandwidth of one MLA decode step: the fused Pallas kernel against the XLA absorbed-attention einsums.

  python benchmarks/mla_decode_kernel.py [--batch=1,16,64] [--cache_lengths=1024,4096,16384] [--heads=16,128]
      [--kv_lora_rank=512] [--rope_dim=64] [--dtype=bfloat16] [--repeats=20] [--warmup=3] [--small]
      [--block_t=..] [--num_splits=..] [--out=benchmarks/results/mla_decode_kernel/<device>.json]

Why: a decode step of absorbed MLA (DeepSeek-V2 sec. 2.1.2) is memory-bound: it must read the whole latent cache,
B x T x (kv_lora_rank + rope_dim) values, and does only ~4 H flops per value read. Its speed is therefore best
quoted as achieved bandwidth, bytes that must move / time, against the device's peak:

  bytes = cache read once (c_kv and k_rope) + the queries (q_latent, q_rope) + the output (f32 latent + f32 LSE)

The kernel (superlm_jax/kernels/mla_decode.py) reads each cache block once for all heads; the XLA reference is
`mla_decode_xla` (scores einsum, masked float32 softmax, output einsum), which XLA may or may not fuse into one pass.
Every cache row is full (lengths = T), so nothing can be skipped and the byte count is exact.

For each (batch, cache length, heads): both functions are jitted, run `--warmup` times untimed (compilation and
warm-up), then `--repeats` timed calls interleaved between the two so background load hits them alike, each timed
to `block_until_ready`; medians are reported. The kernel's output is also checked against the reference.

On CPU, Pallas has no native lowering and the kernel runs in the Pallas INTERPRETER (`interpret=True`, about
0.25 ms per grid step plus per-step copies): CPU numbers say nothing about the kernel's speed; they only show the
script works. There `--small` is the default (a tiny grid that finishes in seconds), and the "peak" is a measured
copy bandwidth. The defaults of the kernel's block sizes are reasoned, not tuned; `--block_t` / `--num_splits` try
others.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import machine  # noqa: E402
from superlm_jax.cli import run_main  # noqa: E402
from superlm_jax.errors import UserError  # noqa: E402
from superlm_jax.kernels.mla_decode import mla_decode_attention, mla_decode_xla, plan_decode  # noqa: E402

_BATCH = flags.DEFINE_list("batch", ["1", "16", "64"], "Batch sizes (sequences decoded together).")
_CACHE = flags.DEFINE_list("cache_lengths", ["1024", "4096", "16384"], "Cache lengths T (all rows full).")
_HEADS = flags.DEFINE_list("heads", ["16", "128"], "Query heads (DeepSeek-V2-Lite 16, V2/V3 128).")
_LATENT = flags.DEFINE_integer("kv_lora_rank", 512, "Latent width of the cache (DeepSeek: 512).")
_ROPE = flags.DEFINE_integer("rope_dim", 64, "Shared rotary key width (DeepSeek: 64; 0 = NoPE).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Cache and query dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per function and shape (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls first (the first one compiles).")
_SMALL = flags.DEFINE_bool("small", None, "A tiny grid that finishes in seconds (default on CPU): batch 2, cache "
                           "256 and 1000, heads 4, kv_lora_rank 64, rope 16, 3 repeats. Flags given explicitly win.")
_BLOCK_T = flags.DEFINE_integer("block_t", None, "Override the kernel's cache rows per inner step.")
_SPLITS = flags.DEFINE_integer("num_splits", None, "Override the kernel's number of splits along T.")
_OUT = flags.DEFINE_string("out", None, "JSON output (default benchmarks/results/mla_decode_kernel/<device>.json).")

SMALL_GRID = {"batch": ["2"], "cache_lengths": ["256", "1000"], "heads": ["4"], "kv_lora_rank": 64, "rope_dim": 16,
              "repeats": 3, "warmup": 1}

# Peak HBM bandwidth from datasheets (bytes/s), matched against `device_kind` in order (first match wins).
PEAK_BANDWIDTH = (
    ("H200", 4.8e12, "NVIDIA H200 SXM datasheet (HBM3e)"),
    ("H100 PCIe", 2.0e12, "NVIDIA H100 PCIe datasheet"),
    ("H100", 3.35e12, "NVIDIA H100 SXM datasheet"),
    ("A100-SXM4-80GB", 2.039e12, "NVIDIA A100 80GB SXM datasheet"),
    ("A100", 1.555e12, "NVIDIA A100 40GB datasheet"),
    ("TPU v4", 1.2e12, "Google Cloud TPU v4 docs"),
    ("TPU v5 lite", 8.19e11, "Google Cloud TPU v5e docs"),
    ("TPU v5e", 8.19e11, "Google Cloud TPU v5e docs"),
    ("TPU v5", 2.765e12, "Google Cloud TPU v5p docs"),
    ("TPU v6", 1.64e12, "Google Cloud TPU v6e (Trillium) docs"),
)


def flag_value(flag, small_value, small: bool):
  """The flag's value, or the small grid's unless the flag was given on the command line."""
  return small_value if small and not flags.FLAGS[flag.name].present else flag.value


def peak_bandwidth() -> tuple[float | None, str]:
  kind = jax.devices()[0].device_kind
  for name, bandwidth, source in PEAK_BANDWIDTH:
    if name.lower() in kind.lower():
      return bandwidth, source
  if jax.default_backend() == "cpu":
    return (machine.memory_bandwidth(256, 3)["bytes_per_s"],
            "measured: best copy of 256 MB on this CPU (bytes read + written)")
  return None, f"unknown for {kind!r}"


def bytes_moved(batch: int, heads: int, cache_len: int, latent: int, rope: int, itemsize: int) -> int:
  """What one step must move at least: the cache once, the queries, the f32 output and LSE."""
  cache = batch * cache_len * (latent + rope) * itemsize
  queries = batch * heads * (latent + rope) * itemsize
  outputs = batch * heads * (latent + 1) * 4
  return cache + queries + outputs


def time_pair(functions: dict, args: tuple, warmup: int, repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each function, interleaved, after `warmup` untimed calls each."""
  for fn in functions.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in functions}
  for _ in range(repeats):
    for name, fn in functions.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return times


def main(argv):
  del argv
  wall_start = time.perf_counter()
  backend = jax.default_backend()
  small = _SMALL.value if _SMALL.value is not None else backend == "cpu"
  try:
    batches = sorted({int(v) for v in flag_value(_BATCH, SMALL_GRID["batch"], small)})
    cache_lengths = sorted({int(v) for v in flag_value(_CACHE, SMALL_GRID["cache_lengths"], small)})
    head_counts = sorted({int(v) for v in flag_value(_HEADS, SMALL_GRID["heads"], small)})
  except ValueError as e:
    raise UserError(f"--batch, --cache_lengths and --heads must be integers: {e}") from e
  latent = flag_value(_LATENT, SMALL_GRID["kv_lora_rank"], small)
  rope = flag_value(_ROPE, SMALL_GRID["rope_dim"], small)
  repeats = flag_value(_REPEATS, SMALL_GRID["repeats"], small)
  warmup = flag_value(_WARMUP, SMALL_GRID["warmup"], small)
  if min(batches + cache_lengths + head_counts) < 1 or latent < 1 or rope < 0 or repeats < 1 or warmup < 1:
    raise UserError("batch, cache length, heads, --kv_lora_rank, --repeats and --warmup must be positive, "
                    "--rope_dim >= 0")
  dtype = jnp.dtype(_DTYPE.value)

  machine_line = machine.describe()
  device_kind = jax.devices()[0].device_kind
  print(f"machine: {machine_line}")
  if backend == "cpu":
    print("CPU: the kernel runs in the Pallas INTERPRETER; these timings are meaningless for the kernel's speed "
          "(they only show that the script and the kernel run)")
  peak, peak_source = peak_bandwidth()
  print(f"peak bandwidth: {'unknown' if peak is None else f'{peak / 1e9:,.0f} GB/s'} ({peak_source})")

  results = []
  head = (f"{'batch':>5} {'cache':>6} {'heads':>5}  {'MB moved':>9}  {'kernel us':>10} {'GB/s':>8} {'%peak':>6}  "
          f"{'xla us':>10} {'GB/s':>8} {'%peak':>6}  {'xla/kernel':>10}  {'max |diff|':>10}")
  print(f"kv_lora_rank {latent}, rope {rope}, {dtype.name}; median of {repeats} after {warmup} warm-up calls")
  print(head)
  print("-" * len(head))
  key = jax.random.key(0)
  for batch in batches:
    for cache_len in cache_lengths:
      for heads in head_counts:
        keys = jax.random.split(jax.random.fold_in(key, batch * 1_000_003 + cache_len * 1009 + heads), 4)
        q_latent = jax.random.normal(keys[0], (batch, heads, latent), dtype)
        q_rope = jax.random.normal(keys[1], (batch, heads, rope), dtype) if rope else None
        c_kv = jax.random.normal(keys[2], (batch, cache_len, latent), dtype)
        k_rope = jax.random.normal(keys[3], (batch, cache_len, rope), dtype) if rope else None
        lengths = jnp.full((batch,), cache_len, jnp.int32)
        scale = 1.0 / np.sqrt(latent + rope)
        functions = {
            "kernel": jax.jit(functools.partial(mla_decode_attention, scale=scale, block_t=_BLOCK_T.value,
                                                num_splits=_SPLITS.value)),
            "xla": jax.jit(functools.partial(mla_decode_xla, scale=scale)),
        }
        args = (q_latent, q_rope, c_kv, k_rope, lengths)
        kernel_out, xla_out = (np.asarray(fn(*args)[0], np.float32) for fn in functions.values())
        max_diff = float(np.abs(kernel_out - xla_out).max())
        times = time_pair(functions, args, warmup, repeats)
        moved = bytes_moved(batch, heads, cache_len, latent, rope, dtype.itemsize)
        plan = plan_decode(batch, heads, cache_len, latent, rope, dtype, block_t=_BLOCK_T.value,
                           num_splits=_SPLITS.value)
        row = {"batch": batch, "cache_len": cache_len, "heads": heads, "bytes": moved, "max_abs_diff": max_diff,
               "plan": dataclasses.asdict(plan)}
        for name, samples in times.items():
          median = statistics.median(samples)
          row[name] = {"median_s": median, "samples_s": samples, "bytes_per_s": moved / median,
                       "fraction_of_peak": None if peak is None else moved / median / peak}
        results.append(row)
        cells = []
        for name in functions:
          r = row[name]
          pct = "n/a" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}"
          cells.append(f"{r['median_s'] * 1e6:>10.1f} {r['bytes_per_s'] / 1e9:>8.1f} {pct:>6}")
        print(f"{batch:>5} {cache_len:>6} {heads:>5}  {moved / 1e6:>9.2f}  {cells[0]}  {cells[1]}  "
              f"{row['xla']['median_s'] / row['kernel']['median_s']:>10.2f}  {max_diff:>10.2e}")

  out = Path(_OUT.value or f"benchmarks/results/mla_decode_kernel/{re.sub(r'[^a-z0-9]+', '_', device_kind.lower())}"
                           f".json")
  out.parent.mkdir(parents=True, exist_ok=True)
  report = {
      "machine": machine_line, "backend": backend, "device_kind": device_kind,
      "kernel_mode": "interpret" if backend == "cpu" else "native",
      "note": ("CPU: the kernel ran in the Pallas interpreter; timings are meaningless for speed" if backend == "cpu"
               else "bytes = cache read once + queries + f32 output and LSE"),
      "peak_bytes_per_s": peak, "peak_source": peak_source, "dtype": dtype.name, "kv_lora_rank": latent,
      "rope_dim": rope, "repeats": repeats, "warmup": warmup, "block_t": _BLOCK_T.value,
      "num_splits": _SPLITS.value, "results": results, "runtime_s": time.perf_counter() - wall_start,
  }
  out.write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {out} ({report['runtime_s']:.0f} s in all)")


if __name__ == "__main__":
  run_main(main)
