"""Parameter creation with logical axis names.

Every parameter carries the names of its axes (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``,
``mlp``, ``position``, ...) as ``out_sharding`` metadata. ``superlm_jax.sharding`` maps those names to mesh axes
with one rules table, so layers never mention devices. ``eager_sharding=False`` keeps creation device-agnostic:
the names are recorded, and placement is decided later by whoever builds the model under a mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], *, std: float | None = None,
          value: float | None = None, dtype=jnp.float32) -> nnx.Param:
  """A float parameter: N(0, std^2) when `std` is given, else the constant `value`."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
  if std is not None:
    data = std * jax.random.normal(rngs.params(), tuple(shape), dtype)
  else:
    data = jnp.full(tuple(shape), value, dtype)
  return nnx.Param(data, out_sharding=tuple(axes), eager_sharding=False)
