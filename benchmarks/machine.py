"""The machine a benchmark ran on: a one-line description (printed with every figure) and its measured memory
bandwidth (the denominator of every bandwidth-floor figure on CPU)."""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def describe() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f"{cpu}, {os.cpu_count()} cores; JAX {jax.__version__} on {len(devices)} x {'/'.join(kinds)} "
          f"({jax.default_backend()})")


def memory_bandwidth(megabytes: int = 512, reps: int = 5) -> dict:
  """Best-of-`reps` copy bandwidth (bytes read + written / s) of a `megabytes` array, with numpy (one thread) and
  with a jitted JAX elementwise op (XLA may use every core); the larger is the machine's figure."""
  n = megabytes * 2**20 // 4
  src = np.ones(n, np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  numpy_bw = 2 * src.nbytes / best
  del src, dst
  x = jnp.ones(n, jnp.float32)
  scale = jax.jit(lambda a: a * 1.5, donate_argnums=0)  # donated: the output reuses the input's pages
  x = scale(x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    x = scale(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  jax_bw = 2 * x.nbytes / best
  del x
  return {"array_mb": megabytes, "numpy_copy_bytes_per_s": numpy_bw, "jax_scale_bytes_per_s": jax_bw,
          "bytes_per_s": max(numpy_bw, jax_bw)}
