"""Rotary position embedding (Su et al. 2021, RoFormer, eq. 34) and YaRN context extension, as pure functions.

Convention: the "rotate half" layout used by Llama/GPT-NeoX and Hugging Face ``transformers``: feature i is paired
with feature i + d/2 (not the interleaved pairs (2i, 2i+1) of the paper). Both are the same rotation up to a fixed
permutation of the projection weights; this layout is what HF Llama checkpoints expect, so their weights load
unpermuted. DeepSeek checkpoints use the interleaved layout; `superlm_jax.interop.hf` permutes their rotary
projection rows once at conversion, which leaves every q.k product unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class YaRN:
  """YaRN (Peng et al. 2023, arXiv 2309.00071): "NTK-by-parts" interpolation of the rotary frequencies (sec. 3.2)
  plus an attention temperature (sec. 3.4), as DeepSeek-V2/V3 use it to extend a 4k-trained context.

  Frequencies that turn fewer than `beta_slow` times over the original context are interpolated (divided by
  `factor`), those that turn more than `beta_fast` times are kept, and a linear ramp blends the ones between.
  """
  factor: float
  original_max_len: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 0.0  # DeepSeek's numerator/denominator of the attention factor (0 = unset, as in transformers).
  mscale_all_dim: float = 0.0
  attention_factor: float = 0.0  # Multiplies cos/sin; 0 = derived from factor/mscale (eq. 22: 0.1 ln s + 1).
  truncate: bool = True  # Round the ramp's correction range to whole dimensions.

  def cos_sin_factor(self) -> float:
    if self.attention_factor:
      return self.attention_factor
    if self.mscale and self.mscale_all_dim:
      return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
    return yarn_mscale(self.factor)

  def softmax_scale_factor(self) -> float:
    """DeepSeek-V2/V3 MLA multiplies its softmax scale by mscale(factor, mscale_all_dim)^2 (their modeling code,
    `yarn_get_mscale`), on top of the cos/sin factor; plain YaRN users (Llama) do not."""
    return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 22), generalised by DeepSeek's `mscale`."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inverse_frequencies(rotary_dim: int, theta: float, yarn: YaRN | None = None) -> jax.Array:
  """theta_j = theta^(-2j/d) for j in [0, d/2): the angular speed of each feature pair (YaRN-blended if given)."""
  if rotary_dim % 2:
    raise ValueError(f"rotary dimension must be even, got {rotary_dim}")
  exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
  if yarn is None:
    return 1.0 / (theta ** exponents)
  base_freqs = theta ** exponents

  def correction_dim(rotations: float) -> float:
    # The dimension whose wavelength fits `rotations` times into the original context (YaRN eq. 16-17).
    return rotary_dim * math.log(yarn.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
  if yarn.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  if low == high:
    high += 0.001  # avoids a division by zero in the ramp
  ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  keep = 1 - ramp  # 1: extrapolate (keep the trained frequency), 0: interpolate (divide it by the factor)
  return (1.0 / (yarn.factor * base_freqs)) * (1 - keep) + (1.0 / base_freqs) * keep


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, yarn: YaRN | None = None) -> jax.Array:
  """Rotates `x` [batch, seq, heads, d] by angle position * theta_j on each pair (j, j + d/2).

  `positions` is [batch, seq] (absolute token positions, so a cached decode step rotates by its true position).
  Computed in float32 and cast back, since bf16 angles at positions in the thousands are off by whole radians.
  With YaRN, cos and sin are also scaled by its attention factor, so q.k logits of the rotary part scale by its
  square (YaRN sec. 3.4, as transformers implements it).
  """
  d = x.shape[-1]
  inv_freq = rope_inverse_frequencies(d, theta, yarn)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, d/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  if yarn is not None:
    cos, sin = cos * yarn.cos_sin_factor(), sin * yarn.cos_sin_factor()
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
