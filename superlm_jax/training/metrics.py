"""Training metrics: metrics.jsonl + TensorBoard, throughput, and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import jax.numpy as jnp

# Dense (no 2:4 sparsity) bf16 peak per chip, matched against `jax.devices()[0].device_kind` in order, so
# more specific names come first. Sources: NVIDIA H100 / H200 datasheets (SXM 989 TFLOP/s; PCIe 756),
# NVIDIA A100 datasheet (312 TFLOP/s), Google Cloud TPU system-architecture pages (v4 275, v5e 197,
# v5p 459, v6e 918 TFLOP/s). JAX names v5e "TPU v5 lite", v5p "TPU v5" and v6e "TPU v6 lite".
_PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe datasheet, bf16 dense"),
    ("H100", 989e12, "NVIDIA H100 SXM datasheet, bf16 dense"),
    ("H200", 989e12, "NVIDIA H200 SXM datasheet, bf16 dense"),
    ("A100", 312e12, "NVIDIA A100 datasheet, bf16 dense"),
    ("TPU v4", 275e12, "Google Cloud TPU v4 docs, bf16"),
    ("TPU v5 lite", 197e12, "Google Cloud TPU v5e docs, bf16"),
    ("TPU v5e", 197e12, "Google Cloud TPU v5e docs, bf16"),
    ("TPU v5", 459e12, "Google Cloud TPU v5p docs, bf16"),
    ("TPU v6 lite", 918e12, "Google Cloud TPU v6e docs, bf16"),
    ("TPU v6e", 918e12, "Google Cloud TPU v6e docs, bf16"),
)


def _parse_record(line: str) -> tuple[str, dict] | None:
  """(line, record) of one metrics.jsonl line; None for a blank or torn one (a write cut short by a kill)."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return (line, record) if isinstance(record, dict) and "step" in record else None


def _finite_or_none(value: Any) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None



def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported on first use (processes that never log do not pay for it) and without
  PyTorch: where torch is installed tensorboardX imports it (seconds) only to accept torch tensors, which we never
  log. A None entry in sys.modules makes that `import torch` fail as if torch were absent, for this import only."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None
    try:
      import tensorboardX  # noqa: F401
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter
  return SummaryWriter


class MetricsLogger:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard (`workdir/tb`), from process 0 only.

  metrics.jsonl holds one JSON object per record: {"step": ..., "split": prefix, name: value, ...}, with
  NaN/inf as null (JSON has no NaN). TensorBoard scalars are named `prefix/name`.

  Args:
    workdir: the run directory (created if missing).
    enabled: False makes every method a no-op (e.g. for dry runs); non-zero processes are always disabled.
    purge_step: records at or after this step are dropped from both outputs: resuming from a checkpoint at step
      N, N + 1 drops what the interrupted run wrote after it; starting without a checkpoint, 1 drops everything
      (a run killed before its first checkpoint starts over). No step is then recorded twice and curves do not
      double back. A torn last line (a process killed while appending) is dropped too.
  """

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, purge_step: int | None = None):
    self.enabled = enabled and jax.process_index() == 0
    self._writer = None
    if not self.enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = workdir / "metrics.jsonl"
    if purge_step is not None and self._jsonl.exists():
      kept = [line for line in map(_parse_record, self._jsonl.read_text().splitlines())
              if line is not None and line[1]["step"] < purge_step]
      # Written aside and renamed over the old file: a run killed here keeps one whole file or the other.
      tmp = self._jsonl.with_name(self._jsonl.name + ".tmp")
      tmp.write_text("".join(text + "\n" for text, _ in kept))
      os.replace(tmp, self._jsonl)
    self._writer = _summary_writer_class()(str(workdir / "tb"), purge_step=purge_step, flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
    """Records scalar `metrics` (floats or scalar jax/numpy arrays) at `step`."""
    if not self.enabled:
      return
    scalars = {name: _finite_or_none(v) for name, v in metrics.items() if np.ndim(v) == 0}
    # Arrays (e.g. per-layer, per-expert MoE load fractions) go to metrics.jsonl as nested lists only.
    arrays = {name: np.vectorize(_finite_or_none, otypes=[object])(np.asarray(v)).tolist()
              for name, v in metrics.items() if np.ndim(v) > 0}
    record = {"step": int(step), "split": prefix, **scalars, **arrays}
    # Opened per record, so a crash loses nothing already written and the file is always whole lines.
    with self._jsonl.open("a") as f:
      f.write(json.dumps(record, allow_nan=False) + "\n")
    for name, value in scalars.items():
      self._writer.add_scalar(f"{prefix}/{name}", float("nan") if value is None else value, int(step))

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Records text (e.g. a generated sample) in TensorBoard's text tab."""
    if self.enabled:
      self._writer.add_text(tag, text, int(step))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _measure_matmul_flops(dtype: Any, n: int, reps: int = 5) -> float:
  """Achieved FLOP/s of a jitted n x n x n matmul on the default device, after a warm-up call."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # Compile and warm caches.
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


@functools.cache
def peak_flops_per_device() -> tuple[float, str]:
  """Peak FLOP/s of one device, and where the figure comes from.

  Known accelerators use their datasheet bf16 dense peak. A CPU has no meaningful datasheet figure for
  XLA, so its "peak" is the measured f32 matmul throughput of the whole process (all cores; with
  --xla_force_host_platform_device_count the fake devices share those cores); an unknown accelerator gets
  a measured bf16 matmul. MFU against a measured peak says how close training runs to the best this
  machine does on a plain matmul, not to a vendor number.
  """
  device = jax.devices()[0]
  kind = device.device_kind
  for name, flops, source in _PEAK_BF16_FLOPS:
    if name.lower() in kind.lower():
      return flops, source
  if device.platform == "cpu":
    return _measure_matmul_flops(jnp.float32, 1024), "measured f32 matmul (1024^3) on this CPU"
  return _measure_matmul_flops(jnp.bfloat16, 4096), f"measured bf16 matmul (4096^3) on {kind!r}"


def peak_flops_total() -> tuple[float, str]:
  """Summed peak FLOP/s of all devices of this process's computation (the CPU figure is already the whole
  process, fake devices included)."""
  flops, source = peak_flops_per_device()
  if jax.devices()[0].platform == "cpu":
    return flops, source
  return flops * jax.device_count(), f"{jax.device_count()} x {source}"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
  """Model FLOPs utilisation (Chowdhery et al. 2022, PaLM, appendix B): achieved / peak FLOP/s.

  `flops_per_token` counts the model's forward + backward FLOPs per token (about 6 N plus attention),
  without rematerialisation; `peak` is the summed peak of the devices that produced `tokens_per_s`.
  """
  return tokens_per_s * flops_per_token / peak if peak > 0 else float("nan")


class Throughput:
  """Tokens per second over a logging window.

  Call `step(tokens)` after every training step and `rate()` when logging. The first `step` only starts
  the clock: it covers compilation, which would otherwise dominate the first window. JAX dispatches
  asynchronously, so block on a result of the latest step (e.g. float(loss)) before calling `rate()`,
  or the window ends before the work does.
  """

  def __init__(self):
    self._start: float | None = None
    self._tokens = 0

  def step(self, tokens: int) -> None:
    if self._start is None:
      self._start = time.perf_counter()
    else:
      self._tokens += tokens

  def reset(self) -> None:
    """Forget the current window, e.g. after time spent evaluating or checkpointing rather than training."""
    self._start, self._tokens = None, 0

  def rate(self) -> float:
    """Tokens/s since the previous `rate()` (or the first step); starts a new window. NaN if none."""
    now = time.perf_counter()
    if self._start is None or self._tokens == 0 or now <= self._start:
      return float("nan")
    tokens_per_s = self._tokens / (now - self._start)
    self._start, self._tokens = now, 0
    return tokens_per_s


def format_for_console(metrics: Mapping[str, Any]) -> str:
  """A short 'loss=2.345 lr=3.0e-04 tok/s=1234 mfu=12.3%' for a tqdm postfix; other keys as 4 digits."""
  parts = []
  for name, value in metrics.items():
    value = float(value)
    if name in ("loss", "val_loss", "train_loss"):
      parts.append(f"{name}={value:.3f}")
    elif name == "lr":
      parts.append(f"lr={value:.1e}")
    elif name in ("tokens_per_s", "tok/s"):
      parts.append(f"tok/s={value:.0f}" if math.isfinite(value) else "tok/s=nan")
    elif name == "mfu":
      parts.append(f"mfu={100 * value:.1f}%")
    else:
      parts.append(f"{name}={value:.4g}")
  return " ".join(parts)
