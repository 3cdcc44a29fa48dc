"""Rotary position embedding (Su et al. 2021, RoFormer, eq. 34), as pure functions.

Convention: the "rotate half" layout used by Llama/GPT-NeoX and Hugging Face ``transformers``: feature i is paired
with feature i + d/2 (not the interleaved pairs (2i, 2i+1) of the paper). Both are the same rotation up to a fixed
permutation of the projection weights; this layout is what HF checkpoints expect, so weights load unpermuted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inverse_frequencies(rotary_dim: int, theta: float) -> jax.Array:
  """theta_j = theta^(-2j/d) for j in [0, d/2): the angular speed of each feature pair."""
  if rotary_dim % 2:
    raise ValueError(f"rotary dimension must be even, got {rotary_dim}")
  return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates `x` [batch, seq, heads, d] by angle position * theta_j on each pair (j, j + d/2).

  `positions` is [batch, seq] (absolute token positions, so a cached decode step rotates by its true position).
  Computed in float32 and cast back, since bf16 angles at positions in the thousands are off by whole radians.
  """
  d = x.shape[-1]
  inv_freq = rope_inverse_frequencies(d, theta)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
