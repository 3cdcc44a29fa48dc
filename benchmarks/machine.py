"""A one-line description of the machine a benchmark ran on (printed with every figure)."""

from __future__ import annotations

import os
import platform

import jax


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
