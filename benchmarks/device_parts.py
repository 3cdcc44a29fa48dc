"""The parts of benchmarks/device_suite.py that time kernels: the machine's ceilings, the MLA decode kernel (its
tests compiled natively, its equality with the XLA path, its bandwidth) and grouped matmul against dense.

Each part is a function of a `Part`, run in a process of its own by the suite (`python benchmarks/device_suite.py
--part NAME ...`). A part records figures as it goes (`Part.attempt`), each under its own key: one figure that fails
(an unsupported shape, a missing optional package) records its error there and the part carries on, and the
part's JSON is rewritten after every figure, so a part killed at its time budget still hands back what it measured.
The model-level parts (train step, decode) are in benchmarks/device_models.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

REPO = Path(__file__).resolve().parents[1]
KERNEL_TESTS = "tests/kernels/test_mla_decode.py"
# On a GPU, the tests that compile the kernel natively there (its GPU plans, the layer, the Generator, decode.impl
# resolution); the rest only interpret CPU/TPU plans, which CI covers, and would cost GPU compiles for nothing.
GPU_KERNEL_TESTS = "gpu or layer_decode or generator or auto or t4 or resolution"
SMOKE_KERNEL_TESTS = "gpu_plan_f32"  # one case of the GPU plan, through the same test code
L2_BYTES = 64 << 20  # H100/H200 L2 is 50/60 MB: input sets rotate through more than this, so no timing is of L2


# ------------------------------------------------------------------------------------------------ the part record
@dataclasses.dataclass
class Part:
  """What one part has measured so far, saved to `path` (JSON) after every figure."""
  path: Path
  deadline: float  # time.time() by which the part must be done (the suite kills it soon after)
  smoke: bool  # tiny sizes: the same code, in seconds, on CPU
  result: dict = dataclasses.field(default_factory=lambda: {"status": "running", "figures": {}, "errors": {},
                                                            "rows": []})

  @property
  def on_gpu(self) -> bool:
    return jax.default_backend() == "gpu"

  def save(self) -> None:
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
    tmp.replace(self.path)  # atomic: the suite never reads half a file

  def time_left(self) -> float:
    return self.deadline - time.time()

  def attempt(self, key: str, measure: Callable[[], Any], *, needs_s: float = 0.0) -> Any:
    """figures[key] = measure(), or errors[key] = why not (also when less than `needs_s` seconds are left)."""
    if self.time_left() < needs_s:
      self.result["errors"][key] = f"skipped: {self.time_left():.0f} s of the part's budget left, {needs_s:.0f} needed"
      self.save()
      return None
    start = time.perf_counter()
    print(f"  {key} ...", flush=True)
    try:
      value = measure()
    except Exception as e:  # noqa: BLE001 (recorded, and the next figure still runs)
      self.result["errors"][key] = describe_error(e)
      print(f"  {key}: FAILED {self.result['errors'][key].splitlines()[0]}", flush=True)
      self.save()
      return None
    self.result["figures"][key] = value
    print(f"  {key}: done in {time.perf_counter() - start:.1f} s", flush=True)
    self.save()
    return value

  def row(self, figure: str, value: str, target: str = "", met: bool | None = None) -> None:
    """One line of the suite's table. `met` is judged on a GPU only: CPU figures say nothing about the targets."""
    self.result["rows"].append({"figure": figure, "value": value, "target": target,
                                "met": met if self.on_gpu and target else None})
    self.save()


def describe_error(e: BaseException) -> str:
  """The exception's one-line summary, then the end of its traceback (enough to see where, short enough for JSON)."""
  lines = traceback.format_exception(e)
  return f"{type(e).__name__}: {str(e)[:1500]}\n" + "".join(lines)[-3000:]


def device_info() -> dict:
  """The accelerator as JAX sees it (initialises the backend: the suite itself never calls this)."""
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  return {"backend": jax.default_backend(), "platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(), "compute_capability": getattr(device, "compute_capability", None),
          "core_count": getattr(device, "core_count", None), "memory_bytes_limit": stats.get("bytes_limit"),
          "jax": jax.__version__}


def peak_bytes_in_use() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


# ------------------------------------------------------------------------------------------------ timing
def seconds_per_call(functions: dict[str, Callable[[int], Any]], *, windows: int, window_s: float,
                     max_calls: int = 2000) -> dict[str, dict]:
  """Median seconds per call of each `fn(i)`, timed as a kernel of microseconds must be on a GPU.

  A call blocked on by itself also times the host's launch and wake-up (tens of microseconds, as long as the MLA
  kernel at batch 64). So each window issues `calls` calls back to back (JAX dispatches asynchronously and one GPU
  stream runs them in order, so the device never waits on the host once the queue is full) and blocks on the last
  one. `fn(i)` picks its inputs by i: rotating input sets keeps a small problem from being timed out of L2. The
  first two calls of each function are untimed (the first compiles; a second may recompile, when another function's
  first Pallas trace changed jax's tracing context in between); a third, blocked one sizes `calls` to fill
  `window_s`. Windows are interleaved across the functions so that clock and load drift hit them alike; a function
  slower than a whole window (an XLA fallback that materialises far more than it must) gets 3 windows of 1 call.
  """
  calls = {}
  for name, fn in functions.items():
    jax.block_until_ready(fn(0))
  for name, fn in functions.items():
    jax.block_until_ready(fn(1))
    start = time.perf_counter()
    jax.block_until_ready(fn(2))
    calls[name] = max(1, min(max_calls, int(window_s / max(time.perf_counter() - start, 1e-7))))
  if min(calls.values()) == 1:
    windows = min(windows, 3)
  samples: dict[str, list[float]] = {name: [] for name in functions}
  for _ in range(windows):
    for name, fn in functions.items():
      start = time.perf_counter()
      out = None
      for i in range(calls[name]):
        out = fn(i)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / calls[name])
  return {name: {"median_s": statistics.median(s), "samples_s": s, "calls_per_window": calls[name]}
          for name, s in samples.items()}


def timing_knobs(part: Part) -> dict:
  return dict(windows=2, window_s=0.002) if part.smoke else dict(windows=7, window_s=0.05)


def input_sets(make: Callable[[int], tuple], bytes_per_set: int, smoke: bool) -> list[tuple]:
  """Enough independent input sets that, rotated, they exceed the L2 several times over (at most 32)."""
  count = 1 if smoke else int(min(32, max(1, math.ceil(4 * L2_BYTES / bytes_per_set))))
  return [make(seed) for seed in range(count)]


def rate(value: float, unit: str) -> str:
  """1.2e12, "B/s" -> "1,200 GB/s"; CPU-sized figures in G, accelerator-sized in T where that reads better."""
  scale, prefix = (1e12, "T") if value >= 1e13 and unit == "FLOP/s" else (1e9, "G")
  return f"{value / scale:,.{0 if value / scale >= 10 else 1}f} {prefix}{unit}"


def relative_error(got, want) -> float:
  """||got - want|| / ||want|| in float64 (METHOD: f32 lands far under 1e-3, bf16 operands 1e-3..1e-2)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.isfinite(got).all():
    return float("inf")
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# ------------------------------------------------------------------------------------------------ machine
def machine_part(part: Part) -> None:
  """The one-line machine description and the two ceilings measured here: copy bandwidth, bf16 matmul rate."""
  from benchmarks import machine
  from benchmarks.mla_decode_kernel import peak_bandwidth
  from superlm_jax.training import metrics

  describe = part.attempt("describe", machine.describe)
  part.row("machine", describe or "?")
  peak_bw, bw_source = peak_bandwidth()
  peak_flops, flops_source = metrics.peak_flops_per_device()
  part.result["figures"]["datasheet"] = {"bytes_per_s": peak_bw, "bytes_source": bw_source,
                                         "bf16_flops": peak_flops, "flops_source": flops_source}
  copy = part.attempt("copy_bandwidth", lambda: machine.memory_bandwidth(32 if part.smoke else 1024, 5))
  if copy:
    share = f" = {copy['jax_scale_bytes_per_s'] / peak_bw:.0%} of {rate(peak_bw, 'B/s')}" if peak_bw else ""
    part.row("device copy (read + write)", f"{rate(copy['jax_scale_bytes_per_s'], 'B/s')}{share}")

  n = 256 if part.smoke else 8192

  def matmul_rate():
    keys = jax.random.split(jax.random.key(0), 2)  # random operands: zeros run faster than real data
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    matmul = jax.jit(jnp.matmul)
    timing = seconds_per_call({"matmul": lambda i: matmul(a, b)}, **timing_knobs(part))["matmul"]
    return {"n": n, "dtype": "bfloat16", "flops_per_s": 2 * n**3 / timing["median_s"], **timing}

  matmul = part.attempt("bf16_matmul", matmul_rate)
  if matmul:
    part.row(f"bf16 matmul {n}^3 (random data)", f"{rate(matmul['flops_per_s'], 'FLOP/s')}"
             f" = {matmul['flops_per_s'] / peak_flops:.0%} of {rate(peak_flops, 'FLOP/s')}")


# ------------------------------------------------------------------------------------------------ kernel tests
def kernel_tests_part(part: Part) -> None:
  """tests/kernels/test_mla_decode.py in this process: on a GPU its GPU-plan cases, the layer and the Generator
  compile the kernel natively (Triton) instead of interpreting it (see `interpret_for` there)."""
  import pytest

  outcomes: dict[str, dict] = {}

  class Collector:
    def pytest_runtest_logreport(self, report):
      if report.when == "call" or report.outcome != "passed":  # failed set-ups and skips count too
        outcomes[report.nodeid] = {"outcome": report.outcome, "when": report.when,
                                   "duration_s": round(report.duration, 3),
                                   "error": str(report.longrepr)[-2000:] if report.failed else None}

  args = [KERNEL_TESTS, "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]
  if part.smoke or part.on_gpu:
    args += ["-k", SMOKE_KERNEL_TESTS if part.smoke else GPU_KERNEL_TESTS]
  exit_code = part.attempt("pytest_exit_code", lambda: int(pytest.main(args, plugins=[Collector()])))
  counts = {k: sum(o["outcome"] == k for o in outcomes.values()) for k in ("passed", "failed", "skipped")}
  part.result["figures"].update(tests=outcomes, counts=counts, native=part.on_gpu or jax.default_backend() == "tpu")
  mode = "native" if part.result["figures"]["native"] else "interpreted"
  part.row(f"kernel tests ({mode}): {KERNEL_TESTS}", f"{counts['passed']} passed, {counts['failed']} failed, "
           f"{counts['skipped']} skipped", "all pass", exit_code == 0 and counts["failed"] == 0)
  if exit_code != 0:
    raise RuntimeError(f"pytest exit code {exit_code}; failed: {[k for k, o in outcomes.items() if o['error']]}")


# ------------------------------------------------------------------------------------------------ the MLA kernel
def mla_inputs(seed: int, batch: int, heads: int, cache_len: int, latent: int, rope: int, dtype) -> tuple:
  """N(0, 1) queries and cache (never zeros), full rows unless a test passes lengths of its own."""
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (batch, heads, latent), dtype),
          jax.random.normal(keys[1], (batch, heads, rope), dtype),
          jax.random.normal(keys[2], (batch, cache_len, latent), dtype),
          jax.random.normal(keys[3], (batch, cache_len, rope), dtype),
          jnp.full((batch,), cache_len, jnp.int32))


def kernel_part(part: Part) -> None:
  """The kernel against the XLA path: equal in float32 and bf16 (ragged lengths, DeepSeek widths), then its
  achieved bandwidth at DeepSeek-V3 decode shapes, as a fraction of the chip's peak and as a speed-up."""
  from benchmarks.mla_decode_kernel import bytes_moved, peak_bandwidth
  from superlm_jax.kernels.mla_decode import mla_decode_attention, mla_decode_xla, plan_decode

  latent, rope = (64, 16) if part.smoke else (512, 64)
  scale = 1.0 / math.sqrt(latent + rope)
  kernel = jax.jit(functools.partial(mla_decode_attention, scale=scale))
  xla = jax.jit(functools.partial(mla_decode_xla, scale=scale))

  # ---- equality: (batch, heads, cache) with ragged lengths; 128 heads = DeepSeek-V3's, two head groups on GPU
  # (smoke: the bandwidth shape below, so that its programs are compiled once)
  equality_shapes = [(2, 4, 256)] if part.smoke else [(4, 16, 4096), (2, 128, 1000)]
  for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    for batch, heads, cache_len in equality_shapes:
      def equality(dtype=dtype, batch=batch, heads=heads, cache_len=cache_len, tolerance=tolerance):
        q, q_rope, c_kv, k_rope, _ = mla_inputs(1, batch, heads, cache_len, latent, rope, dtype)
        lengths = jnp.asarray(np.linspace(1, cache_len, batch).round(), jnp.int32)  # 1 key .. full rows
        with jax.default_matmul_precision("highest"):  # the reference: true f32 dots on upcast inputs
          want = xla(*(a.astype(jnp.float32) for a in (q, q_rope, c_kv, k_rope)), lengths)
        got, xla_same_dtype = kernel(q, q_rope, c_kv, k_rope, lengths), xla(q, q_rope, c_kv, k_rope, lengths)
        errors = {"kernel_out": relative_error(got[0], want[0]), "kernel_lse": relative_error(got[1], want[1]),
                  "xla_out": relative_error(xla_same_dtype[0], want[0])}
        return {"dtype": jnp.dtype(dtype).name, "batch": batch, "heads": heads, "cache_len": cache_len,
                "lengths": np.asarray(lengths).tolist(), "relative_error": errors, "tolerance": tolerance,
                "passed": errors["kernel_out"] <= tolerance and errors["kernel_lse"] <= tolerance}
      name = f"equality_{jnp.dtype(dtype).name}_b{batch}_h{heads}_t{cache_len}"
      result = part.attempt(name, equality)
      if result:
        err = result["relative_error"]
        part.row(f"kernel = XLA path, {result['dtype']}, batch {batch} x {heads} heads x {cache_len}",
                 f"rel. error {err['kernel_out']:.1e} (XLA {result['dtype']}: {err['xla_out']:.1e})",
                 f"<= {tolerance:g}", result["passed"])

  # ---- bandwidth: DeepSeek-V3 decode (batch 64 and 1, cache 4096, 16 and 128 heads, 512 + 64, bf16)
  peak, peak_source = peak_bandwidth()
  part.result["figures"]["peak_bandwidth"] = {"bytes_per_s": peak, "source": peak_source}
  dtype = jnp.bfloat16
  bandwidth_shapes = [(2, 256, 4)] if part.smoke else [(64, 4096, 16), (1, 4096, 16), (64, 4096, 128)]
  for batch, cache_len, heads in bandwidth_shapes:
    def bandwidth(batch=batch, cache_len=cache_len, heads=heads):
      moved = bytes_moved(batch, heads, cache_len, latent, rope, jnp.dtype(dtype).itemsize)
      sets = input_sets(lambda seed: mla_inputs(seed, batch, heads, cache_len, latent, rope, dtype), moved,
                        part.smoke)
      diff = float(jnp.max(jnp.abs(kernel(*sets[0])[0] - xla(*sets[0])[0])))
      times = seconds_per_call({"kernel": lambda i: kernel(*sets[i % len(sets)]),
                                "xla": lambda i: xla(*sets[i % len(sets)])}, **timing_knobs(part))
      for t in times.values():
        t["bytes_per_s"] = moved / t["median_s"]
        t["fraction_of_peak"] = t["bytes_per_s"] / peak if peak else None
      plan = plan_decode(batch, heads, cache_len, latent, rope, dtype)
      return {"batch": batch, "cache_len": cache_len, "heads": heads, "latent": latent, "rope": rope,
              "dtype": jnp.dtype(dtype).name, "bytes": moved, "input_sets": len(sets), "max_abs_diff": diff,
              "plan": dataclasses.asdict(plan), **times,
              "speedup_vs_xla": times["xla"]["median_s"] / times["kernel"]["median_s"]}
    result = part.attempt(f"bandwidth_b{batch}_t{cache_len}_h{heads}", bandwidth, needs_s=10)
    if result:
      k, x = result["kernel"], result["xla"]
      label = f"MLA decode batch {batch}, cache {cache_len}, {heads} heads, {latent}+{rope} bf16"
      big = batch >= 64 and heads == 16  # the shape the targets are set at
      part.row(f"{label}: kernel", f"{rate(k['bytes_per_s'], 'B/s')} = {k['fraction_of_peak']:.0%} of peak, "
               f"{k['median_s'] * 1e6:,.1f} us", ">= 85% of peak" if big else "",
               k["fraction_of_peak"] >= 0.85 if big else None)
      part.row(f"{label}: XLA path", f"{rate(x['bytes_per_s'], 'B/s')} = {x['fraction_of_peak']:.0%} of peak, "
               f"{x['median_s'] * 1e6:,.1f} us")
      part.row(f"{label}: kernel speed-up over XLA", f"{result['speedup_vs_xla']:.2f}x",
               ">= 1.5x" if big else "", result["speedup_vs_xla"] >= 1.5 if big else None)


# ------------------------------------------------------------------------------------------------ grouped matmul
def group_sizes(rows: int, experts: int, skewed: bool) -> np.ndarray:
  """Rows per expert summing to `rows`: equal, or drawn from a Dirichlet(0.3) (a badly balanced router)."""
  if not skewed:
    return np.full(experts, rows // experts, np.int32) + (np.arange(experts) < rows % experts)
  share = np.random.default_rng(0).dirichlet(np.full(experts, 0.3))
  sizes = np.floor(share * rows).astype(np.int32)
  sizes[np.argmax(sizes)] += rows - sizes.sum()
  return sizes


def grouped_matmul_part(part: Part) -> None:
  """`jax.lax.ragged_dot` (and tokamax's grouped matmul kernels, if importable) against a dense matmul of the
  same FLOPs, bf16, DeepSeek-ish: d 2048 into 64 experts of width 1408. 8192 rows is the issue's shape: there
  each expert sees 128 rows and its 369 MB of expert weights outweigh the FLOPs (about 110 FLOP/byte, under the
  H200's ridge of ~200), so no grouped matmul can match dense and the roofline bound is recorded beside it. 65536
  rows (8192 tokens x top-8) is a training step's dispatch, compute-bound like the dense matmul."""
  from benchmarks.mla_decode_kernel import peak_bandwidth

  d, experts, width = (64, 8, 32) if part.smoke else (2048, 64, 1408)
  cases = [(256, False), (1024, True)] if part.smoke else [(8192, False), (65536, False), (65536, True)]
  dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16))
  grouped = {"lax_ragged_dot": jax.jit(
      lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.bfloat16))}
  try:
    import tokamax
    for implementation in ("mosaic", "triton"):  # the GPU kernels; tokamax's "xla" is lax.ragged_dot again
      grouped[f"tokamax_{implementation}"] = jax.jit(functools.partial(
          tokamax.ragged_dot, preferred_element_type=jnp.bfloat16, implementation=implementation))
  except Exception as e:  # noqa: BLE001 (an optional package: its absence is recorded, not a failure)
    part.result["errors"]["tokamax_import"] = describe_error(e)
  peak_bw = peak_bandwidth()[0]

  for rows, skewed in cases:
    tag = f"{rows} rows, d {d} -> {experts} x {width}, {'skewed' if skewed else 'uniform'}"
    key = f"{rows}_{'skewed' if skewed else 'uniform'}"
    sizes = group_sizes(rows, experts, skewed)
    keys = jax.random.split(jax.random.key(rows + skewed), 2)
    x = jax.random.normal(keys[0], (rows, d), jnp.bfloat16)
    w = (jax.random.normal(keys[1], (experts, d, width), jnp.float32) / math.sqrt(d)).astype(jnp.bfloat16)
    w_dense, sizes_device = w[0], jnp.asarray(sizes, jnp.int32)
    flops = 2 * rows * d * width
    # A float64 check of 32 rows: the grouped product must use each row's own expert.
    sample = np.random.default_rng(1).choice(rows, 32, replace=False)
    expert_of_row = np.repeat(np.arange(experts), sizes)[sample]
    want = np.einsum("rd,rdn->rn", np.asarray(x, np.float64)[sample], np.asarray(w, np.float64)[expert_of_row])

    def dense_timing():
      timing = seconds_per_call({"dense": lambda i: dense(x, w_dense)}, **timing_knobs(part))["dense"]
      return {**timing, "flops_per_s": flops / timing["median_s"], "group_sizes": sizes.tolist()}
    reference = part.attempt(f"dense_{key}", dense_timing, needs_s=5)
    if not reference:
      continue
    # The best a grouped matmul can do here: the dense matmul's rate, or reading its operands once at peak.
    grouped_bytes = 2 * (rows * d + experts * d * width + rows * width)
    roofline_s = max(reference["median_s"], grouped_bytes / peak_bw if peak_bw else 0.0)
    for name, fn in grouped.items():
      def measure(fn=fn, name=name):
        error = relative_error(np.asarray(fn(x, w, sizes_device), np.float64)[sample], want)
        timing = seconds_per_call({name: lambda i: fn(x, w, sizes_device)}, **timing_knobs(part))[name]
        return {**timing, "flops_per_s": flops / timing["median_s"], "relative_error_sampled_rows": error,
                "fraction_of_dense": reference["median_s"] / timing["median_s"],
                "roofline_fraction_of_dense": reference["median_s"] / roofline_s}
      result = part.attempt(f"{name}_{key}", measure, needs_s=5)
      if result:
        part.row(f"grouped matmul {tag}, bf16: {name}",
                 f"{rate(result['flops_per_s'], 'FLOP/s')} = {result['fraction_of_dense']:.0%} of dense "
                 f"({rate(reference['flops_per_s'], 'FLOP/s')}; roofline allows "
                 f"{result['roofline_fraction_of_dense']:.0%}), rel. error {result['relative_error_sampled_rows']:.0e}",
                 ">= 80% of dense",
                 result["fraction_of_dense"] >= 0.8 and result["relative_error_sampled_rows"] < 2e-2)


def model_part(name: str) -> Callable[[Part], None]:
  """A part from benchmarks/device_models.py, imported only by the process that runs it."""
  def run(part: Part) -> None:
    from benchmarks import device_models
    getattr(device_models, name)(part)
  return run


PARTS: dict[str, Callable[[Part], None]] = {
    "machine": machine_part,
    "kernel_tests": kernel_tests_part,
    "kernel": kernel_part,
    "grouped_matmul": grouped_matmul_part,
    "decode": model_part("decode_part"),
    "train_step": model_part("train_step_part"),
}


def run_part(name: str, path: str, deadline: float, smoke: bool) -> int:
  """The body of `device_suite.py --part NAME`: runs one part, its record saved to `path` throughout."""
  os.chdir(REPO)  # config files and tests are found relative to the repository
  # Libraries that read absl flags (tokamax) would otherwise parse this process's --part arguments and fail.
  flags.FLAGS.mark_as_parsed()
  part = Part(Path(path), deadline, smoke)
  part.save()
  try:
    part.result["device"] = device_info()
    PARTS[name](part)
    part.result["status"] = "ok"
  except Exception as e:  # noqa: BLE001 (the suite reports it and runs the next part)
    part.result["status"] = "error"
    part.result["error"] = describe_error(e)
    traceback.print_exc()
  part.result["peak_bytes_in_use"] = peak_bytes_in_use()
  part.save()
  return 0 if part.result["status"] == "ok" else 1
